"""Multi-turn rollouts over the episode interface (`dsaforge.synth.episode`), for the in-process engine
(`EnginePolicy`) or an OpenAI-compatible server (`dsaforge.rollout.openai.OpenAIPolicy`); the `generate` command."""
from dsaforge.rollout.policy import EnginePolicy, Policy, Turn, Window
from dsaforge.rollout.runner import STRATEGIES, RolloutConfig, Trajectory, run_episodes, trim_messages

__all__ = ["EnginePolicy", "Policy", "RolloutConfig", "STRATEGIES", "Trajectory", "Turn", "Window", "run_episodes",
           "trim_messages"]
