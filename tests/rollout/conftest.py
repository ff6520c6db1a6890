from tests.model.model_helpers import one_thread  # noqa: F401 (autouse: the rollout tests run on one thread)
