"""Code-interpreter problem families: math and data questions whose answers need executed code. The generator
computes each expected answer in-process by a different route than the reference program that the kernel runs
(a closed form or period formula, the in-memory rows instead of the CSV file), so the reference-passes gate is a
real cross-check. Each family also writes a baseline program with typical mistakes, for the pass@k filter."""
from __future__ import annotations

import csv
import io
import math
import random
from math import gcd

FAMILIES = ("modular_count", "series_sum", "sales_data", "sensor_data")


def _lcm(a: int, b: int) -> int:
    return a * b // gcd(a, b)


def modular_count(rng: random.Random, d: int) -> dict:
    n = rng.randint(5, 20) * 10 ** (2 + min(d, 2))
    a, b, m = rng.randint(1, 50), rng.randint(0, 50), rng.randint(7, 60)
    r = rng.randrange(m)
    conds = [(f"(x * x + {a} * x + {b}) % {m} == {r}", m, lambda x: (x * x + a * x + b) % m == r)]
    text = f"n^2 + {a}n + {b} leaves remainder {r} when divided by {m}"
    for extra in range(1, d):
        q, s = rng.randint(3, 13), None
        s = rng.randrange(q)
        conds.append((f"x % {q} != {s}", q, (lambda q, s: lambda x: x % q != s)(q, s)))
        text += f", and n mod {q} is not {s}"
    period = 1
    for _, p, _ in conds:
        period = _lcm(period, p)
    # Period formula: the conditions depend on n mod period only.
    hits = [x for x in range(period) if all(f(x) for _, _, f in conds)]
    full, rem = divmod(n, period)
    expect = full * len(hits) + sum(1 for x in hits if 1 <= x <= rem)
    cond = " and ".join(c for c, _, _ in conds)
    prompt = f"How many integers n with 1 <= n <= {n} satisfy: {text}? Give the count as a number."
    ref = f"answer = sum(1 for x in range(1, {n} + 1) if {cond})"
    return {"prompt": prompt, "expect": float(expect), "reference": ref, "files": {},
            "mistakes": [f"answer = sum(1 for x in range(1, {n}) if {cond})",
                         f"answer = sum(1 for x in range(0, {n} + 1) if {cond})"]}


def series_sum(rng: random.Random, d: int) -> dict:
    n = rng.randint(2, 9) * 10 ** (3 + min(d, 2))
    c = rng.randint(1, 9)
    p = 2 + (d >= 2)
    sign = d >= 3
    term = f"{'(-1)**(k+1) * ' if sign else ''}1 / (k**{p} + {c})"
    prompt = (f"Compute S = sum over k = 1..{n} of {'(-1)^(k+1) / ' if sign else '1 / '}(k^{p} + {c}) "
              "to at least 9 significant digits.")
    # Generator's route: math.fsum over exact terms in reverse order (different summation than the reference).
    expect = math.fsum(((-1) ** (k + 1) if sign else 1) / (k ** p + c) for k in range(n, 0, -1))
    ref = f"import math\nanswer = math.fsum({term} for k in range(1, {n} + 1))"
    return {"prompt": prompt, "expect": expect, "reference": ref, "files": {},
            "mistakes": [f"answer = sum({term} for k in range(1, {n}))",
                         f"answer = sum({term} for k in range(1, {n // 10} + 1))"]}


REGIONS, PRODUCTS = ["north", "south", "east", "west"], ["P1", "P2", "P3", "P4", "P5", "P6"]


def sales_data(rng: random.Random, d: int) -> dict:
    rows, prices = [], {p: round(rng.uniform(2, 80), 2) for p in PRODUCTS}
    for i in range(rng.randint(200, 400) * d):
        rows.append({"order_id": i, "month": rng.randint(1, 12), "region": rng.choice(REGIONS),
                     "product": rng.choice(PRODUCTS), "units": rng.randint(1, 20), "returned": int(rng.random() < 0.1)})
    region, lo = rng.choice(REGIONS), rng.randint(1, 9)
    hi = lo + rng.randint(1, 3)
    keep = lambda r: r["region"] == region and lo <= r["month"] <= hi and not r["returned"]
    if d >= 3:
        prompt = (f"`sales.csv` lists orders (order_id, month, region, product, units, returned) and `prices.csv` the "
                  f"unit price of each product. Among orders from region {region!r} in months {lo}-{hi} that were not "
                  "returned, find the product with the highest revenue (units x price) and give that revenue.")
        rev = {}
        for r in rows:
            if keep(r):
                rev[r["product"]] = rev.get(r["product"], 0.0) + r["units"] * prices[r["product"]]
        expect = max(rev.values())
        ref = ("import csv\nprice = {r['product']: float(r['price']) for r in csv.DictReader(open('prices.csv'))}\nrev = {}\n"
               "for r in csv.DictReader(open('sales.csv')):\n"
               f"    if r['region'] == {region!r} and {lo} <= int(r['month']) <= {hi} and r['returned'] == '0':\n"
               "        rev[r['product']] = rev.get(r['product'], 0) + int(r['units']) * price[r['product']]\n"
               "answer = max(rev.values())")
        bad = ref.replace(" and r['returned'] == '0'", "")
    else:
        what = "total units" if d == 1 else "total revenue (units x unit price from `prices.csv`)"
        prompt = (f"`sales.csv` lists orders (order_id, month, region, product, units, returned)"
                  f"{' and `prices.csv` the unit price of each product' if d > 1 else ''}. What is the {what} of orders "
                  f"from region {region!r} in months {lo} to {hi} inclusive, excluding returned orders?")
        expect = math.fsum(r["units"] * (prices[r["product"]] if d > 1 else 1) for r in rows if keep(r))
        mult = "* price[r['product']]" if d > 1 else ""
        ref = ("import csv\n" + ("price = {r['product']: float(r['price']) for r in csv.DictReader(open('prices.csv'))}\n" if d > 1 else "")
               + f"answer = sum(int(r['units']) {mult} for r in csv.DictReader(open('sales.csv')) "
               f"if r['region'] == {region!r} and {lo} <= int(r['month']) <= {hi} and r['returned'] == '0')")
        bad = ref.replace(f"<= {hi} and", f"< {hi} and")
    return {"prompt": prompt, "expect": float(expect), "reference": ref, "mistakes": [bad, ref.replace("== '0'", "== '1'")],
            "files": {"sales.csv": _csv(rows), **({"prices.csv": _csv([{"product": k, "price": v} for k, v in prices.items()])} if d > 1 else {})}}


def sensor_data(rng: random.Random, d: int) -> dict:
    sensors = [f"s{i}" for i in range(3)]
    rows = []
    for t in range(rng.randint(150, 300) * d):
        for s in sensors:
            rows.append({"t": t, "sensor": s, "value": round(rng.gauss(20 + sensors.index(s), 3), 3), "ok": int(rng.random() > 0.05)})
    sensor, w = rng.choice(sensors), rng.randint(3, 6 + 4 * d)
    vals = [r["value"] for r in rows if r["sensor"] == sensor and r["ok"]]
    means = [math.fsum(vals[i:i + w]) / w for i in range(len(vals) - w + 1)]
    expect = max(means) if d < 2 else max(means) - min(means)
    asked = "the largest" if d < 2 else "the difference between the largest and the smallest"
    prompt = (f"`sensors.csv` holds readings (t, sensor, value, ok). Drop rows with ok = 0, take sensor {sensor!r} in "
              f"time order and compute the rolling mean over windows of {w} consecutive readings. Give {asked} "
              "rolling mean" + ("" if d < 2 else "s (largest minus smallest)") + ".")
    ref = ("import csv\nv = [float(r['value']) for r in csv.DictReader(open('sensors.csv')) "
           f"if r['sensor'] == {sensor!r} and r['ok'] == '1']\n"
           f"m = [sum(v[i:i + {w}]) / {w} for i in range(len(v) - {w} + 1)]\n"
           + ("answer = max(m)" if d < 2 else "answer = max(m) - min(m)"))
    return {"prompt": prompt, "expect": expect, "reference": ref, "files": {"sensors.csv": _csv(rows)},
            "mistakes": [ref.replace(" and r['ok'] == '1'", ""), ref.replace(f"len(v) - {w} + 1", f"len(v) - {w}")]}


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


GENERATORS = {"modular_count": modular_count, "series_sum": series_sum, "sales_data": sales_data, "sensor_data": sensor_data}
