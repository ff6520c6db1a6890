"""Meeting scheduling: book the earliest slot that fits every attendee (and, at higher levels, a room with enough
seats and buffers around existing meetings). The verifier checks the final calendar state."""
PEOPLE = ["Ana", "Bo", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena", "Mika", "Noor"]
DAY_START, DAY_END = 9 * 60, 17 * 60

SCHEMAS = {
    "get_busy": {"description": "Busy intervals [start, end) in minutes after midnight for a person on a day (1-5).",
                 "parameters": {"type": "object", "properties": {"person": {"type": "string"}, "day": {"type": "integer"}},
                                "required": ["person", "day"]}},
    "book_meeting": {"description": "Book a meeting; start is minutes after midnight. Fails on conflicts.",
                     "parameters": {"type": "object", "properties": {
                         "title": {"type": "string"}, "day": {"type": "integer"}, "start": {"type": "integer"},
                         "duration": {"type": "integer"}, "attendees": {"type": "array", "items": {"type": "string"}},
                         "room": {"type": "string"}}, "required": ["title", "day", "start", "duration", "attendees"]}},
    "list_rooms": {"description": "Rooms with at least the given number of seats.",
                   "parameters": {"type": "object", "properties": {"min_seats": {"type": "integer"}}, "required": ["min_seats"]}},
    "get_room_busy": {"description": "Busy intervals of a room on a day.",
                      "parameters": {"type": "object", "properties": {"room": {"type": "string"}, "day": {"type": "integer"}},
                                     "required": ["room", "day"]}},
}
TOOL_LEVEL = {"get_busy": 1, "book_meeting": 1, "list_rooms": 3, "get_room_busy": 3}


def build_db(conn, rng):
    conn.executescript("""
        CREATE TABLE busy(owner TEXT, kind TEXT, day INTEGER, start INTEGER, "end" INTEGER, title TEXT);
        CREATE TABLE room(name TEXT PRIMARY KEY, seats INTEGER);""")
    people = rng.sample(PEOPLE, rng.randint(6, 10))
    for p in people:
        for day in range(1, 6):
            for _ in range(rng.randint(1, 5)):
                s = rng.randrange(DAY_START, DAY_END - 30, 15)
                conn.execute("INSERT INTO busy VALUES (?,?,?,?,?,?)", (p, "person", day, s, min(DAY_END, s + rng.choice([30, 45, 60, 90, 120])), "existing"))
    for i, seats in enumerate(rng.sample([2, 4, 6, 8, 10, 12], 4)):
        name = f"Room {chr(65 + i)}{seats}"
        conn.execute("INSERT INTO room VALUES (?,?)", (name, seats))
        for day in range(1, 6):
            for _ in range(rng.randint(1, 4)):
                s = rng.randrange(DAY_START, DAY_END - 30, 15)
                conn.execute("INSERT INTO busy VALUES (?,?,?,?,?,?)", (name, "room", day, s, min(DAY_END, s + rng.choice([30, 60, 90])), "existing"))
    conn.commit()


def make_tools(conn):
    def get_busy(person, day):
        return [[s, e] for s, e in conn.execute("SELECT start, \"end\" FROM busy WHERE owner=? AND kind='person' AND day=? ORDER BY start", (person, day))]

    def list_rooms(min_seats):
        return [{"name": n, "seats": s} for n, s in conn.execute("SELECT name, seats FROM room WHERE seats>=? ORDER BY name", (min_seats,))]

    def get_room_busy(room, day):
        return [[s, e] for s, e in conn.execute("SELECT start, \"end\" FROM busy WHERE owner=? AND kind='room' AND day=? ORDER BY start", (room, day))]

    def book_meeting(title, day, start, duration, attendees, room=None):
        end = start + duration
        if not (1 <= day <= 5 and DAY_START <= start and end <= DAY_END):
            return {"error": "outside working hours"}
        owners = [(a, "person") for a in attendees] + ([(room, "room")] if room else [])
        for owner, kind in owners:
            if conn.execute("SELECT 1 FROM busy WHERE owner=? AND kind=? AND day=? AND start<? AND \"end\">?", (owner, kind, day, end, start)).fetchone():
                return {"error": f"{owner} is busy"}
        for owner, kind in owners:
            conn.execute("INSERT INTO busy VALUES (?,?,?,?,?,?)", (owner, kind, day, start, end, title))
        return {"booked": True}

    return {"get_busy": get_busy, "book_meeting": book_meeting, "list_rooms": list_rooms, "get_room_busy": get_room_busy}


def propose(conn, rng, difficulty):
    people = [p for (p,) in conn.execute("SELECT DISTINCT owner FROM busy WHERE kind='person' ORDER BY owner")]
    n = min(len(people), 1 + difficulty)
    params = {"title": f"Review {rng.randrange(1000, 9999)}", "attendees": sorted(rng.sample(people, n)),
              "duration": rng.choice([30, 45, 60]) + 15 * (difficulty >= 4), "from_day": rng.randint(1, 3),
              "needs_room": difficulty >= 3, "buffer": 15 if difficulty >= 4 else 0}
    answer = earliest(conn, params)
    if answer is None:
        return None
    hidden = {"day": answer[0], "start": answer[1]}
    if params["needs_room"]:
        hidden["room"] = answer[2]
    lines = [f"Book a {params['duration']}-minute meeting titled {params['title']!r} with {', '.join(params['attendees'])}.",
             f"It must be the earliest possible slot on day {params['from_day']} or later (days 1-5, 09:00-17:00, "
             "starts on a 15-minute grid)."]
    if params["needs_room"]:
        lines.append(f"It needs a free room with at least {len(params['attendees'])} seats; if several rooms fit the "
                     "earliest slot, take the one whose name sorts first.")
    if params["buffer"]:
        lines.append(f"Every attendee needs {params['buffer']} free minutes before and after the meeting.")
    lines.append('Book it with the tools, then answer {"day": <int>, "start": "HH:MM"}.')
    return params, hidden, "\n".join(lines)


def leaks(hidden):
    """Answer strings a prompt must not contain. A bare day number, and the working-hour bounds 09:00 / 17:00,
    occur in every prompt by design, so the slot counts as leaked only as a day-and-time pair."""
    hhmm = f"{hidden['start'] // 60:02d}:{hidden['start'] % 60:02d}"
    return [f"day {hidden['day']} at {hhmm}", f'"start": "{hhmm}"'] + ([hidden["room"]] if hidden.get("room") else [])


def earliest(conn, params):
    """Generation-time oracle (direct database access is allowed here, not in `solve`)."""
    tools = make_tools(conn)
    busy = lambda who, day: tools["get_busy"](who, day)
    rooms = tools["list_rooms"](len(params["attendees"])) if params["needs_room"] else [None]
    return _sol_scan(params, busy, lambda r, d: tools["get_room_busy"](r, d), rooms, None)


def _sol_scan(params, busy, room_busy, rooms, rng):
    b, dur = params["buffer"], params["duration"]
    day_start, day_end = 9 * 60, 17 * 60          # module constants are out of a solution's reach
    for day in range(params["from_day"], 6):
        intervals = [iv for a in params["attendees"] for iv in busy(a, day)]
        room_ivs = {r["name"]: room_busy(r["name"], day) for r in rooms} if rooms != [None] else {}
        for start in range(day_start, day_end - dur + 1, 15):
            if any(s < start + dur + b and e > start - b for s, e in intervals):
                continue
            if rooms == [None]:
                return [day, start, None]
            free = sorted(n for n, ivs in room_ivs.items() if not any(s < start + dur and e > start for s, e in ivs))
            if free:
                return [day, start, free[0] if rng is None else rng.choice(free)]
    return None


# ---- reference solution: tools and logic only -----------------------------------------------------------------
def solve(tools, params, rng):
    rooms = tools.list_rooms(min_seats=len(params["attendees"])) if params["needs_room"] else [None]
    # The baseline solver forgets the buffer now and then, and picks any free room.
    p = dict(params)
    if rng is not None and rng.random() < 0.25:
        p["buffer"] = 0
    slot = _sol_scan(p, lambda who, day: tools.get_busy(person=who, day=day),
                     lambda r, d: tools.get_room_busy(room=r, day=d), rooms, rng)
    if slot is None:
        return None
    day, start, room = slot
    kw = {"room": room} if room else {}
    tools.book_meeting(title=params["title"], day=day, start=start, duration=params["duration"],
                       attendees=params["attendees"], **kw)
    return {"day": day, "start": f"{start // 60:02d}:{start % 60:02d}"}


# ---- verifier -----------------------------------------------------------------------------------------------
def verify(conn, params, hidden, answer):
    rows = conn.execute("SELECT owner, kind, day, start, \"end\" FROM busy WHERE title=? ORDER BY owner", (params["title"],)).fetchall()
    people = sorted(o for o, k, *_ in rows if k == "person")
    if people != params["attendees"]:
        return False, "the meeting is not booked for exactly the attendees"
    if len({(d, s, e) for _, _, d, s, e in rows}) != 1:
        return False, "the meeting was booked more than once or inconsistently"
    _, _, day, start, end = rows[0]
    if end - start != params["duration"]:
        return False, "wrong duration"
    if [day, start] != [hidden["day"], hidden["start"]]:
        return False, "not the earliest slot that satisfies every constraint"
    rooms = [o for o, k, *_ in rows if k == "room"]
    if params["needs_room"] and rooms != [hidden["room"]]:
        return False, "wrong or missing room"
    if not isinstance(answer, dict) or answer.get("day") != day or answer.get("start") != f"{start // 60:02d}:{start % 60:02d}":
        return False, "the answer does not report the booked slot"
    return True, "ok"
