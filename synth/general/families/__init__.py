"""General-agent task families. Each module is copied verbatim into its environment bundle as `family.py` and
runs inside the sandbox, so it may import only the standard library. A family provides:

- `build_db(conn, rng)`: create and fill the environment's SQLite database (generation time);
- `SCHEMAS` (OpenAI-style tool schemas) and `TOOL_LEVEL` (the difficulty at which each tool joins the toolset);
- `make_tools(conn)`: the tool functions over that database;
- `propose(conn, rng, difficulty)`: -> (params, hidden, prompt), where params are public and hidden is only
  seen by the verifier;
- `solve(tools, params, rng)` (+ helpers named `_sol_*`): the reference solution, tool calls and logic only;
  with an `rng` it is the randomised baseline solver used for the pass@k filter;
- `verify(conn, params, hidden, answer)`: -> (ok, detail) over the answer and the final database state.
"""
FAMILIES = ("trip", "calendar", "ledger")
