"""One module per `sop` verb; each defines a click command named ``command``."""
