"""Score new patients with a finished run's model: the predicted risk of each, and the
decision at the model's threshold, as a CSV. The patients' file is checked and
encoded by the data dictionary stored in the run's model.pt, like training data
(bad input: one line naming the file, line and column, exit 2); its label column is
optional, and where present the clinical metrics are printed too.

    python predict.py --run-dir runs/<run> --data patients.csv [--output risks.csv]
"""

import sys

from securehealth.tools.predict import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
