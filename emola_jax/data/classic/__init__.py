"""Converters from classic facial-affect datasets to FABA-style records.

One module per dataset (its docstring documents the expected on-disk layout); each exposes
`convert(data_root, *, seed, strict, ...) -> common.Converted`. `TASK_OF` gives each format's
task; `folds.py` holds the subject-exclusive fold assignment shared by the AU datasets.
"""

from emola_jax.data.classic import affectnet, bp4d, disfa, gft, raf_db

CONVERTERS = {
    "rafdb": raf_db.convert,
    "affectnet": affectnet.convert,
    "bp4d": bp4d.convert,
    "disfa": disfa.convert,
    "gft": gft.convert,
}
TASK_OF = {"rafdb": "emotion", "affectnet": "emotion", "bp4d": "au", "disfa": "au", "gft": "au"}
FOLD_FORMATS = ("bp4d", "disfa", "gft")
