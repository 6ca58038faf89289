"""Predict the crowd for a new event: the Python API behind launch/predict.py and launch/serve.py.

    from socialalign_jax.predict import Predictor, read_users
    predictor = Predictor.from_run("runs/weibo-default")
    result = predictor.predict("某地宣布明年起延迟退休", read_users("examples/users.jsonl"), samples=2)
    print(result.distribution, result.interval)
    for u in result.users: print(u.user_name, u.posts[0], u.sentiment)

See docs/prediction.md for the bootstrap and the framing comparison.
"""

from socialalign_jax.predict.crowd import DEFAULT_LEVEL, DEFAULT_RESAMPLES, resample_indices, summarise
from socialalign_jax.predict.predictor import (DEFAULT_MAX_USERS, MIN_USERS_FOR_VERDICT, CrowdResult, Difference,
                                               PredictError, Prediction, Predictor, UserResult, default_topic)
from socialalign_jax.predict.users import (User, UsersError, dataset_users, parse_user, parse_users_jsonl,
                                           parse_users_list, read_users, sample_users)

__all__ = ["Predictor", "Prediction", "CrowdResult", "UserResult", "Difference", "PredictError", "default_topic",
           "User", "UsersError", "read_users", "parse_user", "parse_users_jsonl", "parse_users_list",
           "dataset_users", "sample_users", "resample_indices", "summarise", "DEFAULT_LEVEL", "DEFAULT_RESAMPLES",
           "DEFAULT_MAX_USERS", "MIN_USERS_FOR_VERDICT"]
