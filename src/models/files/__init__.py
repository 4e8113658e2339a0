"""Weight files: the HF cache layout (`snapshots`), reading tensors (`tensors`), reading ahead
(`read_ahead`, `early_read`), downloading (`download`) and components shared between
pipelines (`shared_components`). `snapshots`, `read_ahead` and `early_read` import no torch."""
