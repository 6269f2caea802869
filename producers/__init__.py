"""The robot-side runtime, for any robot: the ``Robot`` / ``Operator`` / ``Policy`` / ``PolicySource``
interfaces (``interfaces``), the actor loop (``actor``), camera image encoding (``images``), the Kafka event
publisher and its on-disk spool (``publisher``, ``spool``), loading registered policies (``policies``) and
the registry-following policy source (``registry_source``), the fleet monitor and process supervisor
(``fleet``), an actor's Prometheus metrics (``metrics``), and a synthetic load generator (``loadgen``).

It imports only ``schemas`` (and ``infra.registry`` for the MLflow client): the simulated world lives in
``sim`` and plugs in through the interfaces; seed ranges and probes come from the caller.
"""
