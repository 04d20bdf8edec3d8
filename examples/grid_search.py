"""
Model selection with the volume scorer in GridSearchCV
======================================================

:func:`volsk.make_volume_scorer <volsk.integrations.make_volume_scorer>` turns the log-volume
into a scikit-learn scorer: at each call it fits a :class:`~volsk.LocalVolumeEstimator` to the
fitted model it is handed, with the neighbourhood defined on the scoring data (the held-out
fold), and returns the log-volume in nats — greater is better, a simpler network. It goes into
``GridSearchCV`` next to accuracy, with skorch nets and Pipelines ending in one.

Here a Pipeline (standard scaling + the digits MLP in skorch) is searched over the L2 weight
decay. Every candidate is scored by held-out accuracy and by the log prior probability of its
neighbourhood under one fixed Gaussian prior; ``refit="accuracy"`` picks the final model by
accuracy, and the volumes are there to read alongside.
"""

# %%
import warnings

import pandas as pd
import torch
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from skorch import NeuralNetClassifier

from volsk import make_volume_scorer
from volsk.experiments.digits import load_digits_splits, make_digits_mlp, prior_sigma
from volsk.results import LowEffectiveSampleSizeWarning

torch.set_num_threads(1)  # small operations on a shared CPU: one thread is fastest
# ESS ≈ 1 is expected in thousands of dimensions (the quickstart explains why):
# the warning that says so after every fit is switched off here
warnings.filterwarnings("ignore", category=LowEffectiveSampleSizeWarning)

splits = load_digits_splits()
X = torch.cat([splits.X_train, splits.X_test]).numpy()
y = torch.cat([splits.y_train, splits.y_test]).numpy()

net = NeuralNetClassifier(
    make_digits_mlp,
    criterion=torch.nn.CrossEntropyLoss,
    optimizer=torch.optim.Adam,
    lr=0.01,
    max_epochs=10,
    batch_size=64,
    iterator_train__shuffle=True,
    train_split=None,
    verbose=0,
)


def to_float32(a):
    return a.astype("float32")  # the scaler returns float64; the network wants float32


# volsk estimates the network on what it sees: X after the scaler and the cast
pipe = make_pipeline(StandardScaler(), FunctionTransformer(to_float32), net)

# %%
# The scorer
# ----------
# Parameters are those of :class:`~volsk.LocalVolumeEstimator`, validated at once.
# ``random_state`` defaults to 0, so every candidate and fold is probed along the same
# directions (common random numbers: less noise in the comparison).
volume = make_volume_scorer(cutoff=1e-2, sigma=prior_sigma(), preconditioner="diag_hessian",
                            preconditioner_eps=1e-2, n_samples=30)
print(volume)

# %%
# The search
# ----------
torch.manual_seed(0)  # skorch shuffles batches with torch's global generator
search = GridSearchCV(
    pipe,
    {"neuralnetclassifier__optimizer__weight_decay": [0.0, 5e-4, 5e-3]},
    scoring={"accuracy": "accuracy", "log_volume": volume},
    refit="accuracy",
    cv=KFold(n_splits=2, shuffle=True, random_state=0),
)
search.fit(X, y)

results = pd.DataFrame(search.cv_results_)
columns = {
    "param_neuralnetclassifier__optimizer__weight_decay": "weight_decay",
    "mean_test_accuracy": "accuracy",
    "mean_test_log_volume": "log_volume (nats)",
    "std_test_log_volume": "std over folds",
    "mean_score_time": "score seconds",
}
table = results[list(columns)].rename(columns=columns)
table["weight_decay"] = table["weight_decay"].map("{:g}".format)
table.round(3)

# %%
# Accuracy and log-volume are different criteria, and need not agree: a network can predict
# well and still sit in a small neighbourhood (a long description), or the reverse. Both
# columns come from the same folds, so they can be read side by side, combined in a custom
# ``refit`` callable, or tested with ``permutation_test_score``. Differences in log-volume
# smaller than the spread over folds (or than the estimate's Monte Carlo noise) mean little.
#
# The refitted best estimator is an ordinary fitted Pipeline; the scorer works on it directly:
print("best:", search.best_params_)
print(f"its log-volume on all digits: {volume(search.best_estimator_, X):,.1f} nats")
