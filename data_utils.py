"""The patients a federation trains on, for scripts and notebooks: a facade over
securehealth.data, where each data source is a module in one registry (SOURCES).

    import data_utils
    cfg = securehealth.settings.resolve({"dataset": "breast-cancer"})
    (train_x, train_y), (test_x, test_y) = data_utils.hospital_data(cfg, 0)

To add a data source, write a module like securehealth/data/synthetic.py and add it
to securehealth.data.SOURCES: the `dataset` setting then accepts its name.
"""

from securehealth.data import *  # noqa: F403 (the facade: every public name)
from securehealth.data import __all__  # noqa: F401
