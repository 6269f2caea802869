"""The learner: the VLA policy and value models, HG-DAgger and RECAP, the adaptive online/offline sampler,
the training loop, and publishing versions to the MLflow registry.

It imports only ``lakehouse`` (the tables it reads) and ``rewards`` (the RECAP maths it shares with the stream
processor); it never imports the robots (``producers``, ``sim``), the processor (``consumers``) or the CLI.

Modules (import them directly; this file imports nothing, so a light module stays torch-free):

- ``config``      frozen, validated settings (EncoderConfig, ModelConfig, ValueConfig, SamplerConfig, TrainConfig;
                  RecapConfig re-exported from ``rewards.config``) and their JSON round trip
- ``text``        frozen MiniLM sentence encoder with memory/disk caches; ``EmbeddingTable``
- ``batch``       stored step rows -> labels (``prepare_episode``) -> lazily decoded ``Batch``
- ``model``       ``VLAPolicy`` (CNN or ViT images + instruction + proprio + RECAP indicator -> action chunk),
                  ``PolicyRuntime`` (``act(observation)``, optional classifier-free guidance)
- ``value``       distributional ``ValueModel`` (201 bins over the normalised return), ``train_value``
- ``algorithms``  the ``Algorithm`` protocol, ``HGDagger``, ``Recap``
- ``sampler``     ``AdaptiveSampler`` (equal task weights, loss-driven online share), ``Prefetcher``
- ``quarantine``  ``row_problem`` / ``RowSpec``: rows that cannot be learned from, ``Quarantine`` counts them by reason
- ``trainer``     ``Learner``: one update per ``step()``; ``AsyncPublisher``
- ``registry``    one import for the four below: ``register_policy`` / ``register_value`` / ``load_latest``
- ``artifacts``   a version's files as data (safetensors weights, config JSON, instruction embeddings), the
                  ``sop-vla`` / ``sop-value`` builders actors and the processor instantiate; ``check_finite``
- ``convert``     ``convert_legacy``: a first-format (pickled pyfunc) version re-registered as data
- ``publishing``  ``register_policy`` / ``register_value`` / ``move_alias``
- ``loading``     ``load_latest`` / ``load_version``: versions back for resuming and evaluation
- ``feeder``      ``DeltaFeeder``: Delta ``demonstrations`` / ``steps`` -> sampler buffers, incrementally, on a thread
- ``online``      ``run_learning(LearnConfig, ...)``: the continuous learner behind ``sop learn`` (resume, publish,
                  auto or gated promotion, MLflow metrics, JSON status)
- ``promotion``   ``promote`` / ``rollback`` with a champion history, ``PromotionGate`` on live success
- ``pretrain``    ``pretrain_policy`` (behaviour cloning on demonstrations), ``pretrain_value``
- ``ddp``         DistributedDataParallel under torchrun (gloo on CPU, NCCL on GPU)
- ``synthetic``   step rows shaped like the tables, ``HashEmbedder``: for tests and benchmarks
- ``metrics``     ``LearnerMetrics``: the learner's Prometheus registry (step time, data wait, ω_on, versions, quarantine)

``run_learning`` does all of the following; the loop, by hand::

    cfg_model, cfg_sampler, cfg_train = ModelConfig(), SamplerConfig(), TrainConfig(algorithm="hg-dagger")
    text = SentenceEncoder(cache_dir=run_dir / "embeddings")
    resumed = load_latest("sop-policy", tracking_uri=uri)               # None on a fresh start
    model = resumed.model if resumed else VLAPolicy(cfg_model)
    algorithm = make_algorithm(cfg_train.algorithm, RecapConfig())
    build = BatchBuilder(cfg_model.encoder, text, chunk=cfg_model.chunk, action_dim=cfg_model.action_dim)
    sampler = AdaptiveSampler(cfg_sampler, build, chunk=cfg_model.chunk, accept=algorithm.accepts,
                              spec=RowSpec.for_policy(cfg_model))  # broken rows are quarantined, counted
    for episode in demonstrations:                                      # offline: clean expert labels
        sampler.add_episode(episode, source="offline")
    publish = AsyncPublisher(lambda model, step, metrics: register_policy(   # registers off-thread
        model, tracking_uri=uri, metrics=metrics, lineage={"learner_step": step}, embeddings=text.table(),
        condition=algorithm.condition, step=step))
    with Prefetcher(sampler, depth=cfg_sampler.prefetch_batches) as batches, publish:
        learner = Learner(model, algorithm, batches, cfg_train, feedback=sampler, publish=publish,
                          omega=sampler.omega, start_step=resumed.lineage["learner_step"] if resumed else 0)
        while True:
            for episode in new_closed_episodes():                       # robots' rollouts, human takeovers
                sampler.add_episode(episode, source="online")
            if isinstance(algorithm, Recap) and learner.steps % 100 == 0:  # keep ~30% positive per task
                algorithm.refresh_epsilons(sampler.advantages())
            metrics = learner.step()                                    # never waits on data
"""
