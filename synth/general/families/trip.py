"""Trip planning (the paper's worked example): a multi-day itinerary under a budget with rating, no-repeat,
conditional and cuisine rules. Searching the plan space is hard; checking a plan against the database is easy."""
import json

CITIES = ["Hangzhou", "Suzhou", "Nanjing", "Xiamen", "Chengdu", "Kunming", "Qingdao", "Dalian", "Lhasa", "Guilin"]
CUISINES = ["Zhejiang", "Sichuan", "Cantonese", "Hunan", "Seafood", "Vegetarian"]
WORDS = ["Jade", "Lotus", "Golden", "River", "Lake", "Pine", "Silk", "Cloud", "Moon", "Bamboo", "Harbor", "Stone"]

SCHEMAS = {
    "list_hotels": {"description": "Hotels in a city with their nightly price.",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    "list_restaurants": {"description": "Restaurants in a city with cuisine and average price per person.",
                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    "list_attractions": {"description": "Attractions in a city with ticket price.",
                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    "get_rating": {"description": "The rating (0-5) of a hotel, restaurant or attraction by name.",
                   "parameters": {"type": "object", "properties": {"kind": {"type": "string", "enum": ["hotel", "restaurant", "attraction"]},
                                                                   "name": {"type": "string"}}, "required": ["kind", "name"]}},
    "get_inter_city_transport": {"description": "Transport options and prices between two cities.",
                                 "parameters": {"type": "object", "properties": {"from_city": {"type": "string"}, "to_city": {"type": "string"}},
                                                "required": ["from_city", "to_city"]}},
}
TOOL_LEVEL = {"list_hotels": 1, "list_restaurants": 1, "list_attractions": 1, "get_rating": 2, "get_inter_city_transport": 3}


def build_db(conn, rng):
    conn.executescript("""
        CREATE TABLE hotel(name TEXT PRIMARY KEY, city TEXT, price INTEGER, rating REAL);
        CREATE TABLE restaurant(name TEXT PRIMARY KEY, city TEXT, cuisine TEXT, price INTEGER, rating REAL);
        CREATE TABLE attraction(name TEXT PRIMARY KEY, city TEXT, ticket INTEGER, rating REAL);
        CREATE TABLE transport(from_city TEXT, to_city TEXT, mode TEXT, price INTEGER);""")
    cities = rng.sample(CITIES, rng.randint(2, 4))
    for city in cities:
        names = rng.sample([f"{a} {b}" for a in WORDS for b in WORDS if a != b], 30)
        for i in range(rng.randint(5, 8)):
            conn.execute("INSERT INTO hotel VALUES (?,?,?,?)", (f"{city} {names[i]} Hotel", city, rng.randrange(200, 1200, 10), round(rng.uniform(3.0, 5.0), 1)))
        for i in range(rng.randint(8, 12)):
            conn.execute("INSERT INTO restaurant VALUES (?,?,?,?,?)", (f"{names[10 + i]} Kitchen of {city}", city, rng.choice(CUISINES),
                                                                      rng.randrange(40, 400, 5), round(rng.uniform(3.0, 5.0), 1)))
        for i in range(rng.randint(6, 9)):
            conn.execute("INSERT INTO attraction VALUES (?,?,?,?)", (f"{city} {names[22 + i % 8]} {['Garden', 'Temple', 'Museum', 'Park', 'Pagoda', 'Market', 'Gallery', 'Tower', 'Bridge'][i]}",
                                                                   city, rng.randrange(0, 300, 10), round(rng.uniform(3.0, 5.0), 1)))
    for a in cities:
        for b in cities:
            if a != b:
                for mode in rng.sample(["train", "flight", "bus"], 2):
                    conn.execute("INSERT INTO transport VALUES (?,?,?,?)", (a, b, mode, rng.randrange(80, 900, 10)))
    conn.commit()


def make_tools(conn):
    def list_hotels(city):
        return [{"name": n, "price": p} for n, p in conn.execute("SELECT name, price FROM hotel WHERE city=? ORDER BY name", (city,))]

    def list_restaurants(city):
        return [{"name": n, "cuisine": c, "price": p} for n, c, p in
                conn.execute("SELECT name, cuisine, price FROM restaurant WHERE city=? ORDER BY name", (city,))]

    def list_attractions(city):
        return [{"name": n, "ticket": t} for n, t in conn.execute("SELECT name, ticket FROM attraction WHERE city=? ORDER BY name", (city,))]

    def get_rating(kind, name):
        if kind not in ("hotel", "restaurant", "attraction"):
            return {"error": "kind must be hotel, restaurant or attraction"}
        row = conn.execute(f"SELECT rating FROM {kind} WHERE name=?", (name,)).fetchone()
        return {"error": f"no {kind} named {name}"} if row is None else {"rating": row[0]}

    def get_inter_city_transport(from_city, to_city):
        return [{"mode": m, "price": p} for m, p in conn.execute(
            "SELECT mode, price FROM transport WHERE from_city=? AND to_city=? ORDER BY mode", (from_city, to_city))]

    return {"list_hotels": list_hotels, "list_restaurants": list_restaurants, "list_attractions": list_attractions,
            "get_rating": get_rating, "get_inter_city_transport": get_inter_city_transport}


def propose(conn, rng, difficulty):
    cities = [r[0] for r in conn.execute("SELECT DISTINCT city FROM hotel ORDER BY city")]
    days = min(1 + difficulty, 6)
    params = {"days": days, "route": [rng.choice(cities)] * days, "min_restaurant_rating": None, "rule": None,
              "no_consecutive_cuisine": difficulty >= 4, "budget": None}
    if difficulty >= 3 and len(cities) > 1:
        a, b = rng.sample(cities, 2)
        split = days // 2
        params["route"] = [a] * split + [b] * (days - split)
    if difficulty >= 2:
        params["min_restaurant_rating"] = rng.choice([3.5, 3.8, 4.0])
        first = params["route"][1]
        prices = sorted(p for (p,) in conn.execute("SELECT price FROM hotel WHERE city=?", (first,)))
        attr = sorted(t for (t,) in conn.execute("SELECT ticket FROM attraction WHERE city IN (%s)" % ",".join("?" * len(set(params["route"]))), tuple(set(params["route"]))))
        # Half the time the cheap branch is infeasible, so the cheapest-looking plan breaks the rule.
        cheap_attr = sum(attr[:days])
        params["rule"] = {"hotel_price_over": prices[len(prices) // 2], "then_min_restaurant_rating": 4.5,
                          "else_max_attraction_total": cheap_attr + (rng.choice([20, 60]) if rng.random() < 0.5 else -10)}
    plan = solve(_Direct(make_tools(conn)), params, None)
    if plan is None:
        return None
    cost = plan_cost(conn, params, plan)
    params["budget"] = int(cost + max(10, cost * rng.uniform(0.0, 0.08 / difficulty)))
    prompt = render(params)
    return params, {"reference_plan": plan}, prompt


def leaks(hidden):
    """The reference plan's restaurants and attractions (hotels may legitimately be the only option)."""
    return sorted({d[k] for d in hidden["reference_plan"] for k in ("restaurant", "attraction")})


def render(p):
    route = " -> ".join(dict.fromkeys(p["route"]))
    lines = [f"Plan a {p['days']}-day trip ({route}; days in order: {', '.join(p['route'])}).",
             "Each day needs one hotel, one restaurant and one attraction in that day's city. No restaurant or "
             "attraction may be used twice (hotels may repeat).",
             f"The total cost (hotel prices + restaurant prices + attraction tickets + inter-city transport) must "
             f"not exceed {p['budget']}."]
    if p["min_restaurant_rating"] is not None:
        lines.append(f"Every restaurant must be rated at least {p['min_restaurant_rating']}.")
    if p["rule"]:
        r = p["rule"]
        lines.append(f"If the day-2 hotel costs more than {r['hotel_price_over']}, every restaurant must be rated at "
                     f"least {r['then_min_restaurant_rating']}; otherwise the attraction tickets together must not "
                     f"exceed {r['else_max_attraction_total']}.")
    if p["no_consecutive_cuisine"]:
        lines.append("Restaurants on consecutive days must serve different cuisines.")
    if len(set(p["route"])) > 1:
        lines.append('On the first day in a new city add "transport": the mode taken to get there.')
    lines.append('Answer with a JSON list, one object per day: {"day", "city", "hotel", "restaurant", "attraction"}.')
    return "\n".join(lines)


class _Direct:
    """Tool access without recording, for proposing tasks at generation time."""

    def __init__(self, funcs):
        self.funcs = funcs

    def __getattr__(self, name):
        return lambda **kw: self.funcs[name](**kw)


def plan_cost(conn, params, plan):
    cost = 0
    for d in plan:
        cost += conn.execute("SELECT price FROM hotel WHERE name=?", (d["hotel"],)).fetchone()[0]
        cost += conn.execute("SELECT price FROM restaurant WHERE name=?", (d["restaurant"],)).fetchone()[0]
        cost += conn.execute("SELECT ticket FROM attraction WHERE name=?", (d["attraction"],)).fetchone()[0]
    for i in range(1, len(plan)):
        if params["route"][i] != params["route"][i - 1]:
            row = conn.execute("SELECT price FROM transport WHERE from_city=? AND to_city=? AND mode=?",
                               (params["route"][i - 1], params["route"][i], plan[i].get("transport"))).fetchone()
            cost += row[0] if row else 10 ** 9
    return cost


# ---- reference solution: tools and logic only (checked by the harness) ----------------------------------------
def solve(tools, params, rng):
    route = params["route"]
    days = params["days"]
    hotels, rest, attr, rating = {}, {}, {}, {}
    for city in sorted(set(route)):
        hotels[city] = tools.list_hotels(city=city)
        rest[city] = tools.list_restaurants(city=city)
        attr[city] = tools.list_attractions(city=city)
        if params["min_restaurant_rating"] is not None:
            for r in rest[city]:
                rating[r["name"]] = tools.get_rating(kind="restaurant", name=r["name"])["rating"]
    transport = {}
    for i in range(1, days):
        if route[i] != route[i - 1]:
            opts = tools.get_inter_city_transport(from_city=route[i - 1], to_city=route[i])
            transport[i] = min(opts, key=lambda o: (o["price"], o["mode"])) if rng is None or rng.random() > 0.15 else rng.choice(opts)
    rule = params["rule"]
    branches = [None] if rule is None else ["then", "else"]
    best = None
    for branch in branches:
        plan = _sol_branch(params, hotels, rest, attr, rating, branch, rng)
        if plan is not None and (best is None or plan[0] < best[0]):
            best = plan
    if best is None:
        return None
    out = best[1]
    for i, t in transport.items():
        out[i]["transport"] = t["mode"]
    return out


def _sol_branch(params, hotels, rest, attr, rating, branch, rng):
    route, days, rule = params["route"], params["days"], params["rule"]
    min_r = params["min_restaurant_rating"]
    if branch == "then":
        min_r = max(min_r or 0, rule["then_min_restaurant_rating"])
    hotel_plan, cost = [], 0
    for i, city in enumerate(route):
        opts = sorted(hotels[city], key=lambda h: (h["price"], h["name"]))
        if branch is not None and i == 1:
            over = rule["hotel_price_over"]
            opts = [h for h in opts if (h["price"] > over) == (branch == "then")]
        if not opts:
            return None
        h = opts[0] if rng is None or rng.random() > 0.15 else rng.choice(opts[:3])
        hotel_plan.append(h["name"])
        cost += h["price"]
    # Attractions: cheapest distinct per day (each city's list is separate, so per-city cheapest works).
    attr_plan, used = [], set()
    for city in route:
        opts = [a for a in sorted(attr[city], key=lambda a: (a["ticket"], a["name"])) if a["name"] not in used]
        if not opts:
            return None
        a = opts[0] if rng is None or rng.random() > 0.15 else rng.choice(opts[:2])
        used.add(a["name"])
        attr_plan.append(a["name"])
        cost += a["ticket"]
    if branch == "else":
        total = sum(a["ticket"] for city in set(route) for a in attr[city] if a["name"] in used)
        if total > rule["else_max_attraction_total"]:
            return None
    # Restaurants: branch-and-bound over distinct, rated, cuisine-alternating choices.
    cands = {city: [r for r in sorted(rest[city], key=lambda r: (r["price"], r["name"]))
                    if min_r is None or rating[r["name"]] >= min_r] for city in set(route)}
    # The baseline solver (rng given) is the reference with mistakes: it sometimes shuffles the candidates and
    # always stops at the first plan it finds instead of the cheapest.
    if rng is not None:
        for city in sorted(cands):
            if rng.random() < 0.2:
                rng.shuffle(cands[city])
    best = [None, None]

    def dfs(i, chosen, spent):
        if best[0] is not None and (spent >= best[0] or rng is not None):
            return
        if i == days:
            best[0], best[1] = spent, list(chosen)
            return
        for r in cands[route[i]]:
            if r["name"] in chosen:
                continue
            if params["no_consecutive_cuisine"] and i > 0 and _sol_cuisine(cands, chosen[-1]) == r["cuisine"]:
                continue
            chosen.append(r["name"])
            dfs(i + 1, chosen, spent + r["price"])
            chosen.pop()

    dfs(0, [], 0)
    if best[1] is None:
        return None
    cost += best[0]
    plan = [{"day": i + 1, "city": route[i], "hotel": hotel_plan[i], "restaurant": best[1][i],
             "attraction": attr_plan[i]} for i in range(days)]
    return cost, plan


def _sol_cuisine(cands, name):
    for rs in cands.values():
        for r in rs:
            if r["name"] == name:
                return r["cuisine"]
    return None


# ---- verifier -----------------------------------------------------------------------------------------------
def verify(conn, params, hidden, answer):
    if isinstance(answer, str):
        try:
            answer = json.loads(answer)
        except ValueError:
            return False, "answer is not JSON"
    if not isinstance(answer, list) or len(answer) != params["days"]:
        return False, f"expected a list of {params['days']} days"
    seen_r, seen_a = set(), set()
    for i, d in enumerate(answer):
        if not isinstance(d, dict):
            return False, f"day {i + 1} is not an object"
        city = params["route"][i]
        if d.get("city") != city:
            return False, f"day {i + 1} must be in {city}"
        h = conn.execute("SELECT price FROM hotel WHERE name=? AND city=?", (d.get("hotel"), city)).fetchone()
        r = conn.execute("SELECT cuisine, rating FROM restaurant WHERE name=? AND city=?", (d.get("restaurant"), city)).fetchone()
        a = conn.execute("SELECT ticket FROM attraction WHERE name=? AND city=?", (d.get("attraction"), city)).fetchone()
        if not (h and r and a):
            return False, f"day {i + 1}: unknown hotel, restaurant or attraction in {city}"
        if d["restaurant"] in seen_r or d["attraction"] in seen_a:
            return False, f"day {i + 1} repeats a restaurant or attraction"
        seen_r.add(d["restaurant"])
        seen_a.add(d["attraction"])
        if params["min_restaurant_rating"] is not None and r[1] < params["min_restaurant_rating"]:
            return False, f"day {i + 1}: restaurant rated below {params['min_restaurant_rating']}"
    if params["no_consecutive_cuisine"]:
        cuisines = [conn.execute("SELECT cuisine FROM restaurant WHERE name=?", (d["restaurant"],)).fetchone()[0] for d in answer]
        if any(x == y for x, y in zip(cuisines, cuisines[1:])):
            return False, "same cuisine on consecutive days"
    rule = params["rule"]
    if rule:
        p2 = conn.execute("SELECT price FROM hotel WHERE name=?", (answer[1]["hotel"],)).fetchone()[0]
        if p2 > rule["hotel_price_over"]:
            if any(conn.execute("SELECT rating FROM restaurant WHERE name=?", (d["restaurant"],)).fetchone()[0]
                   < rule["then_min_restaurant_rating"] for d in answer):
                return False, "day-2 hotel is expensive but a restaurant is rated too low"
        elif sum(conn.execute("SELECT ticket FROM attraction WHERE name=?", (d["attraction"],)).fetchone()[0]
                 for d in answer) > rule["else_max_attraction_total"]:
            return False, "attraction tickets exceed the limit"
    cost = plan_cost(conn, params, answer)
    if cost > params["budget"]:
        return False, f"total cost {cost} exceeds the budget {params['budget']}"
    return True, f"ok, cost {cost}"
