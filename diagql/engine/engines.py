"""Which engine runs a connection's passes (docs/ARCHITECTURE.md, "Engines"): "local", in this
process, or "ray", on a Ray cluster; and the model and data given as factories for Ray's
workers to call, resolved here so that the connection holds its own copy of each."""
from __future__ import annotations

from diagql.engine.ray_data import is_ray_dataset
from diagql.errors import DiagQLError
from diagql.suggest import did_you_mean

ENGINES = ("local", "ray")


def open_engine(engine: str, model, data, *, label_key: str | None = None,
                ray_address: str | None = None, ray_workers: int | None = None):
    """``(model, data, engine)``: the model (or the mapping of models) and data the
    connection holds (a factory called once here), and the engine object (None for the
    local one)."""
    if engine not in ENGINES:
        raise DiagQLError(f"unknown engine {engine!r}; the engines are "
                          f"{', '.join(ENGINES)}" + did_you_mean(str(engine), ENGINES))
    if engine == "local":
        if ray_address is not None or ray_workers is not None:
            raise DiagQLError('ray_address and ray_workers need engine="ray"')
        if is_ray_dataset(data):
            raise DiagQLError('a Ray Dataset is read by Ray\'s workers: connect(..., '
                              'engine="ray")')
        return model, data, None
    if ray_workers is not None and (not isinstance(ray_workers, int) or ray_workers < 1):
        raise DiagQLError(f"ray_workers must be a positive number of workers, not {ray_workers!r}")
    from diagql.engine.ray_engine import RayEngine
    from diagql.engine.ray_workers import built_models, driver_reads, items_digest, \
        weights_digests
    from diagql.model.data_forms import is_factory
    from diagql.model.data import ItemSource

    ray = RayEngine(model, data, label_key=label_key, address=ray_address, workers=ray_workers)
    if is_ray_dataset(data):
        data = ray.dataset_head()
    elif is_factory(data):
        data = data()
        try:  # data it cannot read fails the connection as the local engine's would, later
            ray.data_digest = items_digest(ItemSource(data, label_key=label_key))
        except Exception:  # noqa: BLE001 - the user's data, read as the connection will say
            ray.data_digest = None
    models = built_models(model)  # the driver's copies, for the catalog's probe
    ray.digests = weights_digests(model, models)  # before any forward changes a buffer
    ray.several = None not in models
    # Before the driver runs the model (the catalog's probe): a cache its forward fills is
    # then as a fresh worker's.
    ray.reads = driver_reads(ray, models, data)
    return models if ray.several else models[None], data, ray
