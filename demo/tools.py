"""The demo's tools: an OpenAI function definition each, and a scenario generator that writes a user
request, the call that serves it (arguments copied or derived from the request's words), a
simulated result and a final answer that uses the result."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .entities import COUNTRY_LANGUAGES, CONDITIONS, CURRENCIES, MONTHS, NUMBER_WORDS, Pools, translation


@dataclass
class Call:
    """One tool call in a scenario and what the model is taught to say about it."""

    name: str
    arguments: dict
    request: str  # the user's words asking for it
    topic: str  # what is asked, for reasoning and declines ("the weather in Oslo")
    result: dict  # the simulated tool output (sent back as JSON)
    answer: str  # final answer sentence using the result
    key: str  # the value from the result that the answer must contain


@dataclass
class ToolSpec:
    name: str
    description: str
    properties: dict
    required: list[str]
    scenario: Callable[[random.Random, Pools], Call]
    capability: str  # "check the weather", for declines and self-descriptions
    pair: Callable[[random.Random, Pools], tuple[str, list[Call]]] | None = None  # one request, two calls

    def definition(self) -> dict:
        """The tool as an OpenAI client sends it (key order as the server's pydantic models dump it)."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": self.properties, "required": self.required}}}


def _p(type_: str, description: str, **extra) -> dict:
    return {"type": type_, "description": description, **extra}


def pick(rng: random.Random, options):
    return options[rng.randrange(len(options))]


def _decorate(rng: random.Random, text: str) -> str:
    """Politeness, greetings and casing around a request: phrasing varies, values do not."""
    prefix = pick(rng, ["", "", "", "", "Hey, ", "Hi! ", "Quick question: ", "Please, ", "Hello. ", "Could you help? "])
    suffix = pick(rng, ["", "", "", "", " Thanks!", " Thank you.", " Cheers.", " Thanks in advance."])
    if prefix and text[:1].isupper() and not text.startswith(("I ", "I'")) and rng.random() < 0.7:
        text = text[0].lower() + text[1:]
    return prefix + text + suffix


def _date(rng: random.Random) -> tuple[str, str]:
    """(ISO date, how the user says it)."""
    y, m, d = rng.randint(2025, 2027), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{y:04d}-{m:02d}-{d:02d}"
    said = pick(rng, [iso, iso, f"{MONTHS[m - 1]} {d}, {y}", f"{d} {MONTHS[m - 1]} {y}"])
    return iso, said


def _time(rng: random.Random) -> str:
    return f"{rng.randint(7, 21):02d}:{pick(rng, ['00', '15', '30', '45', '00', '10', '20', '50'])}"


def _count(rng: random.Random, n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) and rng.random() < 0.4 else str(n)


def _names_list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ---------------------------------------------------------------- weather

def _weather(rng, pools: Pools, city: str | None = None, unit: str | None = "draw") -> Call:
    city = city or pools.city(rng)
    if unit == "draw":
        r = rng.random()
        unit = "fahrenheit" if r < 0.2 else "celsius" if r < 0.35 else None
    said_unit = {"fahrenheit": pick(rng, [" in Fahrenheit", " in °F", " (in fahrenheit)"]),
                 "celsius": pick(rng, [" in Celsius", " in °C", " in degrees Celsius"]), None: ""}[unit]
    request = pick(rng, [
        "What's the weather in {c}{u}?", "How's the weather in {c} today{u}?", "What is the temperature in {c}{u}?",
        "weather in {c}{u}", "Can you check the weather for {c}{u}?", "Is it cold in {c} right now{u}?",
        "What's it like outside in {c}{u}?", "Tell me the current weather in {c}{u}.", "Do I need a jacket in {c}{u}?",
        "I'm flying to {c} tonight. What's the weather there{u}?", "Current conditions in {c}{u}, please.",
    ]).format(c=city, u=said_unit)
    args = {"city": city} if unit is None else {"city": city, "unit": unit}
    f = unit == "fahrenheit"
    temp = rng.randint(14, 99) if f else rng.randint(-12, 38)
    cond = pick(rng, CONDITIONS)
    deg = "°F" if f else "°C"
    answer = pick(rng, [
        "It's {t}{d} with {k} in {c} right now.", "Right now in {c} it is {t}{d} and {k}.",
        "The current temperature in {c} is {t}{d}, with {k}.", "{c}: {t}{d} and {k} at the moment.",
    ]).format(t=temp, d=deg, k=cond, c=city)
    return Call("get_weather", args, request, f"the weather in {city}",
                {"city": city, "temperature": temp, "unit": unit or "celsius", "condition": cond}, answer, str(temp))


def _weather_pair(rng, pools: Pools) -> tuple[str, list[Call]]:
    a, b = pools.city(rng), pools.city(rng)
    while b == a:
        b = pools.city(rng)
    calls = [_weather(rng, pools, a, None), _weather(rng, pools, b, None)]
    return pick(rng, ["What's the weather in {a} and in {b}?", "Compare the weather in {a} and {b}.",
                      "How warm is it in {a} and {b} right now?"]).format(a=a, b=b), calls


# ---------------------------------------------------------------- stocks

def _stock(rng, pools: Pools, symbol: str | None = None) -> Call:
    sym = symbol or pools.ticker(rng)
    request = pick(rng, [
        "What's the stock price of {s}?", "How is {s} trading today?", "Give me a quote for {s}.", "price of {s} stock",
        "Check {s} for me.", "Where is {s} trading right now?", "What is {s} at today?", "Look up the share price of {s}.",
    ]).format(s=sym)
    price = round(rng.uniform(2, 950), 2)
    change = round(rng.uniform(-7, 7), 1)
    answer = pick(rng, ["{s} is trading at {p} USD, {d} {c}% today.", "{s} is at {p} USD right now ({d} {c}% today).",
                        "Shares of {s} cost {p} USD at the moment."]).format(
        s=sym, p=price, d="up" if change >= 0 else "down", c=abs(change))
    return Call("get_stock_price", {"symbol": sym}, request, f"the share price of {sym}",
                {"symbol": sym, "price": price, "currency": "USD", "change_percent": change}, answer, str(price))


def _stock_pair(rng, pools: Pools) -> tuple[str, list[Call]]:
    a, b = pools.ticker(rng), pools.ticker(rng)
    calls = [_stock(rng, pools, a), _stock(rng, pools, b)]
    return pick(rng, ["How are {a} and {b} trading?", "Get me quotes for {a} and {b}.",
                      "What are the prices of {a} and {b}?"]).format(a=a, b=b), calls


# ---------------------------------------------------------------- e-mail

def _email(rng, pools: Pools) -> Call:
    to, subject, body = pools.email(rng), pools.subject(rng), pools.body(rng)
    request = pick(rng, [
        'Send an email to {to} with the subject "{s}" saying "{b}"', 'Email {to}: subject "{s}", message "{b}"',
        "Please write to {to}. Subject: {s}. Body: {b}", 'Can you e-mail {to} about "{s}"? Tell them: {b}',
        'Mail {to} with subject "{s}" and the text "{b}"',
    ]).format(to=to, s=subject, b=body)
    args = {"to": to, "subject": subject, "body": body}
    r = rng.random()
    if r < 0.2:
        request += pick(rng, [" Mark it as urgent.", " It's urgent!", " (high priority)"])
        args["urgent"] = True
    elif r < 0.3:
        request += pick(rng, [" It's not urgent.", " No rush, normal priority."])
        args["urgent"] = False
    mid = pools.code(rng, "msg_", 5)
    answer = pick(rng, ["Your e-mail to {to} has been sent (message id {m}).", "Done! The message to {to} went out as {m}.",
                        "Sent. {to} will receive it shortly; the message id is {m}."]).format(to=to, m=mid)
    return Call("send_email", args, request, f"to e-mail {to}", {"status": "sent", "message_id": mid}, answer, mid)


# ---------------------------------------------------------------- calendar

def _event(rng, pools: Pools) -> Call:
    title, (iso, said), time = pools.event_title(rng), _date(rng), _time(rng)
    args = {"title": title, "date": iso, "start_time": time}
    extra = ""
    if rng.random() < 0.5:
        minutes = pick(rng, [15, 30, 45, 60, 90, 120])
        extra += pick(rng, [f" for {minutes} minutes", f" lasting {minutes} minutes"])
        args["duration_minutes"] = minutes
    if rng.random() < 0.5:
        people = [pools.first_name(rng) for _ in range(rng.randint(1, 3))]
        extra += f" with {_names_list(people)}"
        args["attendees"] = people
    request = pick(rng, [
        'Add "{t}" to my calendar on {d} at {h}{x}.', "Schedule {t} on {d} at {h}{x}.",
        'Create an event called "{t}" for {d} at {h}{x}.', "Put {t} in my calendar, {d} at {h}{x}.",
    ]).format(t=title, d=said, h=time, x=extra)
    eid = pools.code(rng, "evt_", 4)
    answer = pick(rng, ['"{t}" is on your calendar for {d} at {h} (event {e}).',
                        "Done: {t} on {d} at {h}. The event id is {e}."]).format(t=title, d=iso, h=time, e=eid)
    return Call("create_calendar_event", args, request, f"to schedule {title}",
                {"event_id": eid, "status": "confirmed"}, answer, eid)


# ---------------------------------------------------------------- calculator

_OPS = {"+": ["plus", "+", "added to"], "-": ["minus", "-", "take away"], "*": ["times", "*", "multiplied by", "x"],
        "/": ["divided by", "/", "over"]}


def _calculate(rng, pools: Pools) -> Call:
    op = pick(rng, list(_OPS))
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    if op == "/":
        a = b * rng.randint(2, 99)
    if op == "-" and rng.random() < 0.7:
        a, b = max(a, b), min(a, b)
    expr = f"{a} {op} {b}"
    said = f"{a} {pick(rng, _OPS[op])} {b}"
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    request = pick(rng, ["What is {e}?", "Calculate {e}.", "how much is {e}", "Can you work out {e} for me?",
                         "What's {e}?", "Compute {e}, please."]).format(e=said)
    answer = pick(rng, ["{e} = {v}.", "The answer is {v}.", "That comes to {v}."]).format(e=expr, v=value)
    return Call("calculate", {"expression": expr}, request, f"the result of {expr}", {"result": value}, answer,
                str(value))


# ---------------------------------------------------------------- web search

def _slug(text: str) -> str:
    return "-".join("".join(ch for ch in w.lower() if ch.isalnum()) for w in text.split())


def _search(rng, pools: Pools) -> Call:
    city = pools.city(rng)
    topic = pools.topic(rng)
    query = pick(rng, [f"{topic} in {city}", f"best {topic} near {city}", f"how to {pools.howto_task(rng)}",
                       f"{city} {topic}"])
    request = pick(rng, ["Search the web for {q}.", "Look up {q}.", "Can you search for {q}?", "Find results for {q}.",
                         "search: {q}", "I need info on {q}. Search online."]).format(q=query)
    args = {"query": query}
    n = None
    if rng.random() < 0.4:
        n = rng.randint(1, 8)
        request += pick(rng, [f" Show me the top {_count(rng, n)} results.", f" Just {_count(rng, n)} results, please."])
        args["max_results"] = n
    site = pick(rng, ["wanderly", "citylens", "howtohub", "localpages", "gidea", "roamwise", "dailyfix", "knowly"])
    titles = [pick(rng, ["The {n} best {q}", "{Q}: a local guide", "{Q} explained", "A beginner's guide: {q}",
                         "{Q} (updated {y})"]).format(n=rng.randint(5, 25), q=query, Q=query[0].upper() + query[1:],
                                                      y=rng.randint(2023, 2026))
              for _ in range(min(n or 3, 3))]
    results = [{"title": t, "url": f"https://{pick(rng, [site, 'webfind', 'infoport'])}.com/{_slug(t)[:40]}"}
               for t in titles]
    answer = pick(rng, ['The top result is "{t}" ({u}).', 'I found "{t}" at {u}.',
                        'Best match: "{t}" - {u}']).format(t=titles[0], u=results[0]["url"])
    return Call("web_search", args, request, f"a web search for {query}", {"results": results}, answer, titles[0])


# ---------------------------------------------------------------- translation

_LANGS = COUNTRY_LANGUAGES[:4]


def _translate(rng, pools: Pools, phrase: str | None = None, lang: str | None = None) -> Call:
    phrase = phrase or pools.phrase(rng)
    lang = lang or pick(rng, _LANGS)
    request = pick(rng, ['Translate "{p}" into {l}.', 'How do you say "{p}" in {l}?', 'What is "{p}" in {l}?',
                         '"{p}" in {l}, please.', 'Can you translate "{p}" to {l}?']).format(p=phrase, l=lang)
    args = {"text": phrase, "target_language": lang.lower()}
    r = rng.random()
    if r < 0.15:
        request += pick(rng, [" Use the formal register.", " Keep it formal."])
        args["formal"] = True
    elif r < 0.25:
        request += pick(rng, [" Informal is fine.", " Casual, please."])
        args["formal"] = False
    text = translation(phrase, lang)
    answer = pick(rng, ['In {l}, "{p}" is "{t}".', '"{t}" is how you say it in {l}.',
                        'The {l} translation is "{t}".']).format(l=lang, p=phrase, t=text)
    return Call("translate_text", args, request, f"a translation into {lang}",
                {"translation": text, "language": lang.lower()}, answer, text)


# ---------------------------------------------------------------- reminders (nested object)

def _reminder(rng, pools: Pools) -> Call:
    task, (iso, said), time = pools.task(rng), _date(rng), _time(rng)
    request = pick(rng, ["Remind me to {t} on {d} at {h}.", "Set a reminder to {t} at {h} on {d}.",
                         "Don't let me forget to {t}: {d}, {h}.", "Create a reminder: {t}, {d} at {h}."]).format(
        t=task, d=said, h=time)
    args = {"text": task, "due": {"date": iso, "time": time}}
    r = rng.random()
    if r < 0.2:
        request += pick(rng, [" It's important.", " High priority."])
        args["priority"] = "high"
    elif r < 0.3:
        request += pick(rng, [" Low priority.", " Not important."])
        args["priority"] = "low"
    rid = pools.code(rng, "rem_", 4)
    answer = pick(rng, ["Okay, I'll remind you to {t} on {d} at {h} (reminder {r}).",
                        "Reminder {r} is set: {t}, {d} at {h}."]).format(t=task, d=iso, h=time, r=rid)
    return Call("create_reminder", args, request, f"a reminder to {task}",
                {"reminder_id": rid, "status": "scheduled"}, answer, rid)


# ---------------------------------------------------------------- restaurant (nested object, enum, boolean)

_DIETS = {"vegetarian": ["vegetarian", "veggie"], "vegan": ["vegan"], "gluten_free": ["gluten-free", "gluten free"]}


def _table(rng, pools: Pools) -> Call:
    rest, n, (iso, said), time = pools.restaurant(rng), rng.randint(1, 12), _date(rng), _time(rng)
    request = pick(rng, ["Book a table for {n} at {r} on {d} at {h}", "Reserve {r} for {n} people, {d} at {h}",
                         "I need a table at {r} for {n} on {d}, {h}", "Get us a table for {n} at {r}, {d} at {h}"]
                   ).format(n=_count(rng, n), r=rest, d=said, h=time)
    args = {"restaurant": rest, "party_size": n, "date": iso, "time": time}
    prefs = {}
    if rng.random() < 0.35:
        prefs["outdoor"] = rng.random() < 0.6
        request += pick(rng, [", outside if possible", " on the terrace"] if prefs["outdoor"] else
                        [", indoors please", ", inside"])
    if rng.random() < 0.3:
        diet = pick(rng, list(_DIETS))
        prefs["dietary"] = diet
        request += pick(rng, [f". We're {pick(rng, _DIETS[diet])}", f", {pick(rng, _DIETS[diet])} options needed"])
    if prefs:
        args["preferences"] = prefs
    request += "."
    conf = pools.code(rng, "RES-", 4)
    answer = pick(rng, ["Your table for {n} at {r} is booked for {d} at {h}. Confirmation: {c}.",
                        "Booked! {r}, {d} at {h}, party of {n} (confirmation {c})."]).format(
        n=n, r=rest, d=iso, h=time, c=conf)
    return Call("book_table", args, request, f"a table at {rest}", {"confirmation": conf, "status": "booked"},
                answer, conf)


# ---------------------------------------------------------------- currency

def _currency(rng, pools: Pools) -> Call:
    a, b = rng.sample(CURRENCIES, 2)
    amount = rng.randint(1, 5000) if rng.random() < 0.7 else round(rng.uniform(1, 900), 2)
    request = pick(rng, ["How much is {x} {a} in {b}?", "Convert {x} {a} to {b}.", "What's {x} {a} in {b}?",
                         "{x} {a} to {b}, please.", "Exchange {x} {a} into {b} for me."]).format(x=amount, a=a, b=b)
    rate = round(rng.uniform(0.05, 40), 4)
    converted = round(amount * rate, 2)
    answer = pick(rng, ["{x} {a} is about {y} {b}.", "That's {y} {b} at a rate of {r}.",
                        "{x} {a} = {y} {b}."]).format(x=amount, a=a, y=converted, b=b, r=rate)
    return Call("convert_currency", {"amount": amount, "from_currency": a, "to_currency": b}, request,
                f"a currency conversion from {a} to {b}",
                {"amount": amount, "from": a, "to": b, "rate": rate, "converted": converted}, answer, str(converted))


# ---------------------------------------------------------------- flights

_CABINS = {"economy": ["economy", "in economy"], "premium_economy": ["premium economy", "in premium economy"],
           "business": ["business class", "in business"], "first": ["first class", "in first class"]}


def _flights(rng, pools: Pools) -> Call:
    a, b = pools.city(rng), pools.city(rng)
    iso, said = _date(rng)
    args = {"origin": a, "destination": b, "date": iso}
    extra = ""
    if rng.random() < 0.45:
        n = rng.randint(1, 9)
        extra += pick(rng, [f" for {_count(rng, n)} passengers", f" for {_count(rng, n)} people"])
        args["passengers"] = n
    if rng.random() < 0.35:
        cabin = pick(rng, list(_CABINS))
        extra += " " + pick(rng, _CABINS[cabin])
        args["cabin"] = cabin
    if rng.random() < 0.25:
        args["nonstop"] = rng.random() < 0.7
        extra += ", nonstop only" if args["nonstop"] else ", stops are fine"
    request = pick(rng, ["Find flights from {a} to {b} on {d}{x}.", "I need a flight {a} to {b}, {d}{x}.",
                         "Search flights {a} -> {b} for {d}{x}.", "Are there flights from {a} to {b} on {d}{x}?"]
                   ).format(a=a, b=b, d=said, x=extra)
    letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2))
    flights = [{"flight": f"{letters}{rng.randint(100, 9999)}", "departs": _time(rng), "price": rng.randint(49, 2400),
                "stops": 0 if args.get("nonstop") else rng.randint(0, 2)} for _ in range(2)]
    f = flights[0]
    answer = pick(rng, ["The best option is flight {f} departing at {t} for {p} USD.",
                        "Flight {f} leaves at {t} and costs {p} USD."]).format(f=f["flight"], t=f["departs"], p=f["price"])
    return Call("search_flights", args, request, f"flights from {a} to {b}", {"flights": flights}, answer, f["flight"])


# ---------------------------------------------------------------- time

def _time_in(rng, pools: Pools, city: str | None = None) -> Call:
    city = city or pools.city(rng)
    request = pick(rng, ["What time is it in {c}?", "Current local time in {c}?", "Is it late in {c} right now?",
                         "What's the time in {c}?", "time in {c}"]).format(c=city)
    local = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    off = f"{pick(rng, ['+', '-'])}{rng.randint(0, 12):02d}:{pick(rng, ['00', '00', '30', '45'])}"
    answer = pick(rng, ["It's {t} in {c} right now (UTC{o}).", "The local time in {c} is {t}."]).format(
        t=local, c=city, o=off)
    return Call("get_time", {"city": city}, request, f"the local time in {city}",
                {"city": city, "local_time": local, "utc_offset": off}, answer, local)


def _time_pair(rng, pools: Pools) -> tuple[str, list[Call]]:
    a, b = pools.city(rng), pools.city(rng)
    return (pick(rng, ["What time is it in {a} and in {b}?", "Local time in {a} and {b}?"]).format(a=a, b=b),
            [_time_in(rng, pools, a), _time_in(rng, pools, b)])


# ---------------------------------------------------------------- music

def _music(rng, pools: Pools) -> Call:
    r = rng.random()
    artist = pools.person(rng)
    if r < 0.4:
        query = pools.song(rng)
        request = pick(rng, ["Play {q}.", "Put on {q}, please.", "I want to hear {q}."]).format(q=query)
        track = query
    elif r < 0.7:
        query = pools.genre(rng)
        request = pick(rng, ["Play some {q}.", "Put on some {q} music.", "I'm in the mood for {q}."]).format(q=query)
        track = pools.song(rng)
    else:
        query = artist
        request = pick(rng, ["Play music by {q}.", "Play something from {q}.", "Put on {q}."]).format(q=query)
        track = pools.song(rng)
    args = {"query": query}
    if rng.random() < 0.25:
        request += " On shuffle."
        args["shuffle"] = True
    if rng.random() < 0.25:
        v = rng.randint(1, 20) * 5
        request += f" Volume {v}."
        args["volume"] = v
    answer = pick(rng, ['Now playing "{t}" by {a}.', 'Playing "{t}" by {a}. Enjoy!']).format(t=track, a=artist)
    return Call("play_music", args, request, f"music ({query})", {"status": "playing", "track": track, "artist": artist},
                answer, track)


# ---------------------------------------------------------------- directions

_MODES = {"driving": ["by car", "driving"], "walking": ["on foot", "walking"], "cycling": ["by bike", "cycling"],
          "transit": ["by public transport", "by train or bus"]}


def _directions(rng, pools: Pools) -> Call:
    a, b = pools.city(rng), pools.city(rng)
    args = {"origin": a, "destination": b}
    mode_text = ""
    if rng.random() < 0.6:
        mode = pick(rng, list(_MODES))
        mode_text = " " + pick(rng, _MODES[mode])
        args["mode"] = mode
    request = pick(rng, ["How do I get from {a} to {b}{m}?", "Directions from {a} to {b}{m}, please.",
                         "How long does it take to go from {a} to {b}{m}?", "Route from {a} to {b}{m}?"]).format(
        a=a, b=b, m=mode_text)
    km = round(rng.uniform(1, 900), 1)
    minutes = rng.randint(5, 900)
    answer = pick(rng, ["It's {k} km and takes about {m} minutes.", "Expect about {m} minutes for the {k} km."]).format(
        k=km, m=minutes)
    return Call("get_directions", args, request, f"directions from {a} to {b}",
                {"distance_km": km, "duration_minutes": minutes, "mode": args.get("mode", "driving")}, answer,
                str(minutes))


# ---------------------------------------------------------------- contacts

def _contact(rng, pools: Pools) -> Call:
    name = pools.person(rng)
    wants = pick(rng, ["phone", "email"])
    request = (pick(rng, ["What's {n}'s phone number?", "Find the phone number of {n}.", "How can I call {n}?"])
               if wants == "phone" else
               pick(rng, ["What's {n}'s email address?", "Do I have an email for {n}?", "Look up {n}'s e-mail."])
               ).format(n=name)
    first, last = name.split(" ", 1)
    email = f"{first.lower()}.{last.lower().replace(' ', '')}@{pick(rng, pools.domains)}"
    phone = f"+{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
    key = phone if wants == "phone" else email
    answer = ("{n}'s phone number is {v}." if wants == "phone" else "{n}'s email address is {v}.").format(n=name, v=key)
    return Call("lookup_contact", {"name": name}, request, f"the contact details of {name}",
                {"name": name, "email": email, "phone": phone}, answer, key)


# ---------------------------------------------------------------- the catalogue

_DATE = "Date as YYYY-MM-DD"
TOOLS: dict[str, ToolSpec] = {t.name: t for t in [
    ToolSpec("get_weather", "Get the current weather for a city",
             {"city": _p("string", "City name"),
              "unit": _p("string", "Temperature unit", enum=["celsius", "fahrenheit"])},
             ["city"], _weather, "check the weather", _weather_pair),
    ToolSpec("get_stock_price", "Get the latest share price for a ticker symbol",
             {"symbol": _p("string", "Ticker symbol, e.g. ACME")}, ["symbol"], _stock, "look up share prices",
             _stock_pair),
    ToolSpec("send_email", "Send an e-mail",
             {"to": _p("string", "Recipient address"), "subject": _p("string", "Subject line"),
              "body": _p("string", "Message text"), "urgent": _p("boolean", "Mark as high priority")},
             ["to", "subject", "body"], _email, "send e-mails"),
    ToolSpec("create_calendar_event", "Add an event to the user's calendar",
             {"title": _p("string", "Event title"), "date": _p("string", _DATE),
              "start_time": _p("string", "Start time as HH:MM"),
              "duration_minutes": _p("integer", "Length in minutes"),
              "attendees": _p("array", "Names of the people to invite", items={"type": "string"})},
             ["title", "date", "start_time"], _event, "manage your calendar"),
    ToolSpec("calculate", "Evaluate an arithmetic expression",
             {"expression": _p("string", "Expression using + - * /")}, ["expression"], _calculate, "do arithmetic"),
    ToolSpec("web_search", "Search the web",
             {"query": _p("string", "Search query"), "max_results": _p("integer", "How many results to return")},
             ["query"], _search, "search the web"),
    ToolSpec("translate_text", "Translate text into another language",
             {"text": _p("string", "Text to translate"),
              "target_language": _p("string", "Language to translate into",
                                    enum=[lang.lower() for lang in _LANGS]),
              "formal": _p("boolean", "Use the formal register")},
             ["text", "target_language"], _translate, "translate text"),
    ToolSpec("create_reminder", "Create a reminder",
             {"text": _p("string", "What to remind the user of"),
              "due": _p("object", "When the reminder fires",
                        properties={"date": _p("string", _DATE), "time": _p("string", "HH:MM")},
                        required=["date", "time"]),
              "priority": _p("string", "Priority", enum=["low", "normal", "high"])},
             ["text", "due"], _reminder, "set reminders"),
    ToolSpec("book_table", "Reserve a table at a restaurant",
             {"restaurant": _p("string", "Restaurant name"), "party_size": _p("integer", "Number of guests"),
              "date": _p("string", _DATE), "time": _p("string", "HH:MM"),
              "preferences": _p("object", "Seating and dietary wishes",
                                properties={"outdoor": _p("boolean", "Sit outside"),
                                            "dietary": _p("string", "Dietary need",
                                                          enum=["none", *list(_DIETS)])})},
             ["restaurant", "party_size", "date", "time"], _table, "book restaurant tables"),
    ToolSpec("convert_currency", "Convert an amount between currencies",
             {"amount": _p("number", "Amount to convert"), "from_currency": _p("string", "ISO code, e.g. EUR"),
              "to_currency": _p("string", "ISO code, e.g. USD")},
             ["amount", "from_currency", "to_currency"], _currency, "convert currencies"),
    ToolSpec("search_flights", "Search for flights",
             {"origin": _p("string", "Departure city"), "destination": _p("string", "Arrival city"),
              "date": _p("string", _DATE), "passengers": _p("integer", "Number of passengers"),
              "cabin": _p("string", "Cabin class", enum=list(_CABINS)),
              "nonstop": _p("boolean", "Only direct flights")},
             ["origin", "destination", "date"], _flights, "search for flights"),
    ToolSpec("get_time", "Get the local time in a city", {"city": _p("string", "City name")}, ["city"], _time_in,
             "tell the local time", _time_pair),
    ToolSpec("play_music", "Play music",
             {"query": _p("string", "Song, artist or genre"), "shuffle": _p("boolean", "Shuffle playback"),
              "volume": _p("integer", "Volume from 0 to 100")},
             ["query"], _music, "play music"),
    ToolSpec("get_directions", "Get travel directions between two places",
             {"origin": _p("string", "Start"), "destination": _p("string", "End"),
              "mode": _p("string", "Travel mode", enum=list(_MODES))},
             ["origin", "destination"], _directions, "give directions"),
    ToolSpec("lookup_contact", "Find a contact's phone number and e-mail", {"name": _p("string", "Full name")},
             ["name"], _contact, "look up contacts"),
]}


def request_for(rng: random.Random, call: Call) -> str:
    return _decorate(rng, call.request)
