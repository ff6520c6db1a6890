"""dsaforge: DeepSeek-V3.2's training recipe as a workflow-orchestrated platform."""

__version__ = "0.1.0"
