"""dsaforge.synth: agentic task synthesis - environments, tools, tasks, verifiers and the sandbox they run in.

Public API:
- `task.Task`, `task.load_tasks`, `task.write_manifest`, `task.MANIFEST_SCHEMA`: the contract SFT, RL and eval use;
- `generate.synthesize(cfg.synth, out_dir, data_dir)`: the offline generator; `stage.run(ctx)`: the pipeline stage;
- `sandbox.Sandbox`, `sandbox.SandboxUnavailable`: bubblewrap isolation for every piece of untrusted code;
- `gates.validate_env`, `gates.BaselineSolver`, `llm.ChatSolver`: the gates and the pass@k solvers;
- `registry.agent_class(name)`: the four agent classes (general, code, search, code_interpreter).
"""
if __name__ == "synth":  # imported under its bare name from a checkout's root: dsaforge/_layout.py
    from dsaforge._layout import hand_over
    hand_over(__name__, __path__[0])
