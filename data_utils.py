"""The patients a federation trains on, for scripts and notebooks: securehealth.data's names.

    cfg = securehealth.settings.resolve({"dataset": "breast-cancer"})
    (train_x, train_y), (test_x, test_y) = data_utils.hospital_data(cfg, 0)

A data source is a module (like securehealth/data/synthetic.py) in securehealth.data.SOURCES.
"""

from securehealth.data import *  # noqa: F403 (the facade: every public name)
from securehealth.data import __all__  # noqa: F401
