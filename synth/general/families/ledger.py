"""Ledger audit: find the vendor with the highest net spend in a category and month, and flag exactly its large
transactions. Paging, refunds and multiple accounts make it harder; the verifier checks answer and flags."""
VENDORS = ["Acme Supply", "Blue Harbor", "Cobalt Foods", "Delta Print", "Evergreen IT", "Falcon Travel",
           "Granite Office", "Helix Labs", "Iris Catering", "Juniper Cloud"]
CATEGORIES = ["travel", "office", "software", "catering", "hardware"]

SCHEMAS = {
    "list_accounts": {"description": "All account ids with their owners.",
                      "parameters": {"type": "object", "properties": {}}},
    "list_transactions": {"description": "Transactions of an account in a month (YYYY-MM), 10 per page (page from 0).",
                          "parameters": {"type": "object", "properties": {"account": {"type": "string"}, "month": {"type": "string"},
                                                                          "page": {"type": "integer"}}, "required": ["account", "month"]}},
    "flag_transaction": {"description": "Flag a transaction id for review.",
                         "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}},
}
TOOL_LEVEL = {"list_accounts": 1, "list_transactions": 1, "flag_transaction": 1}


def build_db(conn, rng):
    conn.executescript("""
        CREATE TABLE account(id TEXT PRIMARY KEY, owner TEXT);
        CREATE TABLE tx(id INTEGER PRIMARY KEY, account TEXT, month TEXT, amount INTEGER, category TEXT, vendor TEXT, flagged INTEGER DEFAULT 0);""")
    vendors = rng.sample(VENDORS, 6)
    for i in range(rng.randint(2, 4)):
        acc = f"ACC-{rng.randrange(100, 999)}{i}"
        conn.execute("INSERT INTO account VALUES (?,?)", (acc, rng.choice(["ops", "sales", "research", "finance"])))
        for month in ("2025-01", "2025-02", "2025-03"):
            for _ in range(rng.randint(12, 40)):
                amount = rng.randrange(20, 2000)
                if rng.random() < 0.12:
                    amount = -amount // 2      # refunds
                conn.execute("INSERT INTO tx(account, month, amount, category, vendor) VALUES (?,?,?,?,?)",
                             (acc, month, amount, rng.choice(CATEGORIES), rng.choice(vendors)))
    conn.commit()


def make_tools(conn):
    def list_accounts():
        return [{"id": a, "owner": o} for a, o in conn.execute("SELECT id, owner FROM account ORDER BY id")]

    def list_transactions(account, month, page=0):
        rows = conn.execute("SELECT id, amount, category, vendor FROM tx WHERE account=? AND month=? ORDER BY id LIMIT 10 OFFSET ?",
                            (account, month, 10 * int(page))).fetchall()
        return [{"id": i, "amount": a, "category": c, "vendor": v} for i, a, c, v in rows]

    def flag_transaction(id):
        cur = conn.execute("UPDATE tx SET flagged=1 WHERE id=?", (int(id),))
        return {"flagged": cur.rowcount == 1}

    return {"list_accounts": list_accounts, "list_transactions": list_transactions, "flag_transaction": flag_transaction}


def propose(conn, rng, difficulty):
    accounts = [a for (a,) in conn.execute("SELECT id FROM account ORDER BY id")]
    scope = accounts if difficulty >= 3 else [rng.choice(accounts)]
    params = {"accounts": scope, "month": rng.choice(["2025-01", "2025-02", "2025-03"]),
              "category": rng.choice(CATEGORIES), "threshold": rng.choice([300, 500, 800]), "net_refunds": difficulty >= 2}
    q = "SELECT vendor, SUM(amount) FROM tx WHERE account IN (%s) AND month=? AND category=?%s GROUP BY vendor" % (
        ",".join("?" * len(scope)), "" if params["net_refunds"] else " AND amount>0")
    totals = sorted(conn.execute(q, (*scope, params["month"], params["category"])).fetchall(), key=lambda r: (-r[1], r[0]))
    if len(totals) < 2 or totals[0][1] == totals[1][1]:
        return None
    vendor = totals[0][0]
    flags = [i for (i,) in conn.execute("SELECT id FROM tx WHERE account IN (%s) AND month=? AND vendor=? AND amount>?" % ",".join("?" * len(scope)),
                                        (*scope, params["month"], vendor, params["threshold"]))]
    if not flags:
        return None
    who = f"account {scope[0]}" if len(scope) == 1 else "all accounts together"
    prompt = (f"Audit {who} for {params['month']}: find the vendor with the highest total spend in category "
              f"{params['category']!r}" + (" (refunds are negative amounts and count against the total)" if params["net_refunds"]
                                          else " (count only positive amounts)") +
              f". Then flag every transaction of that vendor in that month and scope, in any category, whose amount is above "
              f"{params['threshold']}, and flag nothing else. Transactions are listed 10 per page. "
              'Answer {"vendor": <name>, "flagged": <number of transactions flagged>}.')
    return params, {"vendor": vendor, "flags": sorted(flags)}, prompt


def leaks(hidden):
    return [hidden["vendor"]] + [f"id {i}" for i in hidden["flags"]]


# ---- reference solution: tools and logic only -----------------------------------------------------------------
def solve(tools, params, rng):
    txs = []
    for acc in params["accounts"]:
        page = 0
        while True:
            batch = tools.list_transactions(account=acc, month=params["month"], page=page)
            txs.extend(batch)
            # The baseline solver sometimes stops after the first page.
            if len(batch) < 10 or (rng is not None and rng.random() < 0.1):
                break
            page += 1
    totals = {}
    for t in txs:
        if t["category"] == params["category"] and (params["net_refunds"] or t["amount"] > 0):
            totals[t["vendor"]] = totals.get(t["vendor"], 0) + t["amount"]
    if not totals:
        return None
    vendor = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    flagged = [t["id"] for t in txs if t["vendor"] == vendor and t["amount"] > params["threshold"]]
    for i in flagged:
        tools.flag_transaction(id=i)
    return {"vendor": vendor, "flagged": len(flagged)}


# ---- verifier -----------------------------------------------------------------------------------------------
def verify(conn, params, hidden, answer):
    flagged = [i for (i,) in conn.execute("SELECT id FROM tx WHERE flagged=1 ORDER BY id")]
    if flagged != hidden["flags"]:
        return False, f"{len(flagged)} transactions flagged, not exactly the required ones"
    if not isinstance(answer, dict) or answer.get("vendor") != hidden["vendor"] or answer.get("flagged") != len(flagged):
        return False, "wrong vendor or flag count in the answer"
    return True, "ok"
