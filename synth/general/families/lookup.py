"""Lookup: read one item's code with a tool and answer it. The tiny-RL family: one tool call and a one-number
answer, short enough for a 2-layer model to learn through the whole agent path (chat template, episode interface,
sandboxed tool, verifier). Not among the families `synthesize` draws from (see `dsaforge.synth.tiny_rl`)."""
NAMES = ["red", "blue", "green", "gold", "iron", "salt", "rose", "pine", "wolf", "bear", "lake", "moon"]

SCHEMAS = {
    "get_code": {"description": "The code of an item.",
                 "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
}
TOOL_LEVEL = {"get_code": 1}


def build_db(conn, rng):
    conn.execute("CREATE TABLE item(name TEXT PRIMARY KEY, code INTEGER)")
    for name in NAMES:
        conn.execute("INSERT INTO item VALUES (?,?)", (name, rng.randrange(10, 42)))
    conn.commit()


def make_tools(conn):
    def get_code(name):
        row = conn.execute("SELECT code FROM item WHERE name=?", (str(name),)).fetchone()
        return {"code": row[0]} if row else {"error": f"no item named {name}"}

    return {"get_code": get_code}


def propose(conn, rng, difficulty):
    name = rng.choice(NAMES)
    (code,) = conn.execute("SELECT code FROM item WHERE name=?", (name,)).fetchone()
    prompt = f'Use get_code to find the code of "{name}". Answer {{"answer": <code>}}.'
    return {"name": name}, {"code": code}, prompt


def leaks(hidden):
    return [f"code {hidden['code']}"]


# ---- reference solution: tools and logic only -----------------------------------------------------------------
def solve(tools, params, rng):
    return tools.get_code(name=params["name"]).get("code")


# ---- verifier -----------------------------------------------------------------------------------------------
def verify(conn, params, hidden, answer):
    if answer != hidden["code"]:
        return False, f"answer {answer!r} is not the code of {params['name']}"
    return True, "ok"
