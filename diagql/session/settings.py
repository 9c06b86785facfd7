"""Session settings that SET changes: each with its type, check and meaning in one place."""
from __future__ import annotations

from dataclasses import dataclass, fields

from diagql.errors import BindError, whole
from diagql.results.formats import FORMATS, MAX_ROWS

ESTIMATORS = ("assisted", "plain")  # engine/regression.py; the sample mean


@dataclass
class Settings:
    batch_size: int = 256
    seed: int = 0
    latent: str | None = None  # None: the input of the final linear layer
    format: str = "table"
    max_rows: int = MAX_ROWS
    model: str | None = None  # the default model's name; None: the first one
    estimator: str = "assisted"  # a sample's answer: regression on the latent, or plain mean

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def describe(self) -> dict[str, str]:
        return {
            "batch_size": "items per forward pass",
            "seed": "random_state of samplers that do not set one",
            "latent": "layer whose output is the latent space (default: input of the final linear layer)",
            "format": "output format of the CLI and REPL: " + ", ".join(FORMATS),
            "max_rows": "rows the CLI and REPL show per table before the rest is counted "
                        "(print(result) in Python: 20; to_text(result, max_rows=...))",
            "model": "the model an unqualified layer name reads (SHOW MODELS lists them)",
            "estimator": "a sample's answer: assisted (corrected by a regression on the latent, "
                         "with estimates for every sampler) or plain (the sample mean)",
        }

    def __setattr__(self, name: str, value) -> None:
        """Every setting is checked as SET checks it, ``conn.settings.batch_size = 0`` too (it
        had reached a pass as range()'s ValueError: sweep SY8)."""
        super().__setattr__(name, value if value is None and name in ("latent", "model")
                            else self.coerce(name, value))

    def coerce(self, name: str, value, written: str | None = None):
        """The value SET would store, or a BindError naming what is wrong with it;
        ``written``: the value's text, which names a layer or model where it is a number."""
        if name in ("latent", "model") and isinstance(value, (int, float)) and written:
            value = written  # SET latent = 0.10: the layer 0.10, not 0.1
        if name in ("batch_size", "seed", "max_rows"):
            value = whole(value)  # a numpy integer (np.int64(64)) is one
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # SET seed = 1e3
            if isinstance(value, bool) or not isinstance(value, int):
                raise BindError(f"{name} must be a whole number, not {value!r}")
            if value < (0 if name == "seed" else 1):
                raise BindError(f"{name} must be at least {0 if name == 'seed' else 1}, not {value}")
            return value
        if name == "format":
            value = str(value).lower()
            if value not in FORMATS:
                raise BindError(f"format must be one of {', '.join(FORMATS)}, not {value!r}")
            return value
        if name == "estimator":
            value = str(value).lower()
            if value not in ESTIMATORS:
                raise BindError(f"estimator must be one of {', '.join(ESTIMATORS)}, not "
                                f"{value!r}")
            return value
        if name == "latent":
            value = whole(value)  # latent=1, a Sequential's layer '1' (np.int64(1) too)
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise BindError(f"latent names one layer (a str, or a Sequential's index), "
                                f"not {type(value).__name__}")
            return None if str(value).lower() in ("default", "none") else str(value)
        if name == "model":
            return str(value)
        from diagql.suggest import did_you_mean

        raise BindError(f"unknown setting {name!r}{did_you_mean(name, self.names())}; the "
                        f"settings are {', '.join(self.names())}")
