"""Entity pools for the synthetic corpus, split between training and held-out evaluation.

Every value belongs to exactly one split (a stable hash decides), and invented values (made of
syllables) add an unbounded supply of names the model cannot have memorised: it has to copy.
"""

from __future__ import annotations

import random
import zlib

SPLITS = ("train", "heldout")
HELDOUT_SHARE = 5  # one value in five is held out


def split_of(value: str) -> str:
    return "heldout" if zlib.crc32(value.lower().encode()) % HELDOUT_SHARE == 0 else "train"


CITIES = """Paris London Berlin Madrid Rome Lisbon Vienna Prague Warsaw Budapest Athens Dublin Oslo Stockholm
Helsinki Copenhagen Amsterdam Brussels Zürich Geneva Munich Hamburg Milan Naples Barcelona Valencia Seville
Porto Kraków Gdańsk Tallinn Riga Vilnius Reykjavík Edinburgh Glasgow Manchester Liverpool Bristol Cardiff Belfast
Lyon Marseille Nice Toulouse Bordeaux Strasbourg Antwerp Rotterdam Utrecht Bergen Gothenburg Malmö Aarhus Turku
Salzburg Graz Ljubljana Zagreb Split Belgrade Sofia Bucharest Istanbul Ankara Izmir Cairo Marrakesh Casablanca
Tunis Lagos Accra Nairobi Kampala Addis Ababa Johannesburg Cape Town Durban Dakar Tokyo Osaka Kyoto Sapporo Seoul
Busan Beijing Shanghai Shenzhen Chengdu Hong Kong Taipei Manila Hanoi Bangkok Chiang Mai Kuala Lumpur Singapore
Jakarta Bali Mumbai Delhi Bangalore Chennai Kolkata Karachi Lahore Dhaka Kathmandu Colombo Dubai Doha Muscat
Tehran Baghdad Amman Beirut Jerusalem Tbilisi Yerevan Baku Almaty Tashkent Sydney Melbourne Brisbane Perth Adelaide
Auckland Wellington Christchurch Honolulu Anchorage Vancouver Calgary Toronto Montréal Ottawa Québec Halifax Seattle
Portland San Francisco Los Angeles San Diego Las Vegas Phoenix Denver Austin Dallas Houston Chicago Detroit
Minneapolis Boston New York Philadelphia Washington Atlanta Miami Orlando Nashville New Orleans Havana Mexico City
Guadalajara Monterrey Bogotá Medellín Lima Quito Santiago Valparaíso Buenos Aires Córdoba Montevideo Asunción
São Paulo Rio de Janeiro Salvador Recife Brasília Caracas Panama City San José""".split()
# multi-word cities are listed as consecutive words; join the known ones back
_JOIN = ["Addis Ababa", "Cape Town", "Hong Kong", "Chiang Mai", "Kuala Lumpur", "San Francisco", "Los Angeles",
         "San Diego", "Las Vegas", "New York", "New Orleans", "Mexico City", "Buenos Aires", "São Paulo",
         "Rio de Janeiro", "Panama City", "San José"]


def _join_multiword(words: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(words):
        for name in _JOIN:
            parts = name.split()
            if words[i:i + len(parts)] == parts:
                out.append(name)
                i += len(parts)
                break
        else:
            out.append(words[i])
            i += 1
    return out


CITIES = _join_multiword(CITIES)

FIRST_NAMES = """Anna Ben Clara David Elena Felix Greta Hugo Ines Jonas Karla Leo Maria Nils Olga Pablo Quinn Rosa
Sven Tara Uma Viktor Wanda Xavier Yara Zoe Amir Bea Carlos Dana Emil Fatima Gustav Hana Ivan Julia Kenji Lina Mateo
Nadia Oscar Priya Rafael Sara Tomas Ulla Vera William Ximena Yusuf Zara Aiko Bruno Chloe Diego Esra Farid Gloria
Hassan Ingrid Jamal Kaia Lars Mei Noah Odile Pedro Rania Sofia Theo Ulrich Valentina Wei Yosef Zeynep Ahmed Bianca
Cem Dmitri Eva Freya Goran Helga Ida Jakob Katya Luca Marta Nora Omar Pia Ravi Selin Timo Ada Boris Celine Dario
Elif Filip Hiro Ilse Joao Kofi Lucia Magnus Nina Otto Paula Rui Stella Tariq Alma Basil Cora Dina Ezra Flora""".split()

LAST_NAMES = """Berg Novak Silva Kowalski Larsen Moreau Rossi Schmidt Tanaka Kim Nguyen Okafor Haddad Petrov Jensen
Fischer Costa Dubois Romano Weber Yilmaz Sato Park Chen Ali Mensah Ivanova Nielsen Bauer Ferreira Laurent Bianchi
Wagner Demir Suzuki Lee Wang Khan Boateng Popescu Hansen Keller Almeida Girard Ricci Becker Kaya Ito Choi Liu Shah
Adeyemi Horvat Lund Vogel Santos Fontaine Greco Hoffmann Aydin Kato Jung Zhang Malik Owusu Dimitrov Holm Koch Rocha
Mercier Conti Schulz Arslan Mori Kang Huang Iqbal Asante Markovic Strand Frank Pereira Lambert Marino Braun""".split()

EMAIL_DOMAINS = """example.com mail.org inbox.net post.io acme.co northwind.biz contoso.org fabrikam.net
globex.com initech.io umbrella.org hooli.com piedpiper.net vandelay.biz wayne.co stark.io""".split()

# Invented place and person names from syllables: the supply of never-seen values.
_ONSETS = "b br c d dr f g gr h k kr l m n p pr r s st t tr v z sh ch th".split()
_VOWELS = "a e i o u ai ea io ou y".split()
_CODAS = ["", "", "", "n", "r", "s", "l", "m", "th", "x", "nd", "rk", "sk", "lt"]
_PLACE_ENDS = ["", "", "ia", "ova", "heim", "burg", "ton", "ford", "grad", "mouth", "holm", "stad", "polis", "ville"]


def invented_word(rng: random.Random, syllables: int | None = None) -> str:
    n = syllables or rng.choice((2, 2, 2, 3))
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n))
    return word.capitalize()


def invented_place(rng: random.Random) -> str:
    return invented_word(rng, rng.choice((1, 2, 2))) + rng.choice(_PLACE_ENDS)


COUNTRY_LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Swedish", "Japanese"]

PHRASES = {
    # English: {language: translation}
    "good morning": {"French": "bonjour", "Spanish": "buenos días", "German": "guten Morgen", "Italian": "buongiorno"},
    "thank you very much": {"French": "merci beaucoup", "Spanish": "muchas gracias", "German": "vielen Dank",
                            "Italian": "grazie mille"},
    "where is the train station": {"French": "où est la gare", "Spanish": "dónde está la estación de tren",
                                   "German": "wo ist der Bahnhof", "Italian": "dov'è la stazione"},
    "good night": {"French": "bonne nuit", "Spanish": "buenas noches", "German": "gute Nacht", "Italian": "buona notte"},
    "how much does this cost": {"French": "combien ça coûte", "Spanish": "cuánto cuesta esto",
                                "German": "wie viel kostet das", "Italian": "quanto costa questo"},
    "I would like a coffee": {"French": "je voudrais un café", "Spanish": "quisiera un café",
                              "German": "ich hätte gern einen Kaffee", "Italian": "vorrei un caffè"},
    "see you tomorrow": {"French": "à demain", "Spanish": "hasta mañana", "German": "bis morgen", "Italian": "a domani"},
    "happy birthday": {"French": "joyeux anniversaire", "Spanish": "feliz cumpleaños",
                       "German": "alles Gute zum Geburtstag", "Italian": "buon compleanno"},
    "the bill, please": {"French": "l'addition, s'il vous plaît", "Spanish": "la cuenta, por favor",
                         "German": "die Rechnung, bitte", "Italian": "il conto, per favore"},
    "I am lost": {"French": "je suis perdu", "Spanish": "estoy perdido", "German": "ich habe mich verlaufen",
                  "Italian": "mi sono perso"},
    "welcome home": {"French": "bienvenue à la maison", "Spanish": "bienvenido a casa",
                     "German": "willkommen zu Hause", "Italian": "bentornato a casa"},
    "it is raining": {"French": "il pleut", "Spanish": "está lloviendo", "German": "es regnet", "Italian": "piove"},
    "I love this city": {"French": "j'adore cette ville", "Spanish": "me encanta esta ciudad",
                         "German": "ich liebe diese Stadt", "Italian": "adoro questa città"},
    "the door is open": {"French": "la porte est ouverte", "Spanish": "la puerta está abierta",
                         "German": "die Tür ist offen", "Italian": "la porta è aperta"},
    "excuse me": {"French": "excusez-moi", "Spanish": "disculpe", "German": "entschuldigen Sie", "Italian": "mi scusi"},
    "good luck": {"French": "bonne chance", "Spanish": "buena suerte", "German": "viel Glück", "Italian": "buona fortuna"},
    "where is the hotel": {"French": "où est l'hôtel", "Spanish": "dónde está el hotel", "German": "wo ist das Hotel",
                           "Italian": "dov'è l'albergo"},
    "I need a doctor": {"French": "j'ai besoin d'un médecin", "Spanish": "necesito un médico",
                        "German": "ich brauche einen Arzt", "Italian": "ho bisogno di un medico"},
    "the food is delicious": {"French": "la nourriture est délicieuse", "Spanish": "la comida está deliciosa",
                              "German": "das Essen ist lecker", "Italian": "il cibo è delizioso"},
    "what time is it": {"French": "quelle heure est-il", "Spanish": "qué hora es", "German": "wie spät ist es",
                        "Italian": "che ore sono"},
}

TOPICS = ["hiking trails", "bike routes", "vegan bakeries", "jazz clubs", "museums", "bookshops", "farmers markets",
          "street food", "coworking spaces", "public libraries", "climbing gyms", "thrift stores", "night markets",
          "botanical gardens", "ramen shops", "tea houses", "board game cafés", "swimming pools", "ferry schedules",
          "flea markets", "ski resorts", "surf schools", "record stores", "art galleries", "dog parks"]
HOWTO = ["repot a cactus", "fix a flat bike tire", "bake sourdough bread", "clean a cast iron pan",
         "brew cold coffee", "tie a bowline knot", "grow basil indoors", "descale a kettle", "learn touch typing",
         "train for a 10k run", "fold a fitted sheet", "sharpen a kitchen knife", "start a compost bin",
         "remove a wine stain", "change a car battery", "make kimchi", "patch drywall", "prune tomato plants",
         "back up a phone", "write a cover letter", "plan a road trip", "pick a ripe avocado", "knit a scarf"]
TASKS = ["call the dentist", "water the plants", "pay the rent", "buy milk", "renew my passport", "send the invoice",
         "pick up the dry cleaning", "book a haircut", "feed the cat", "return the library books", "check the oven",
         "take out the recycling", "submit the report", "call grandma", "charge the laptop", "order printer ink",
         "walk the dog", "pack for the trip", "backup the server", "review the contract", "buy a birthday card",
         "cancel the gym membership", "defrost the freezer", "update the budget sheet", "stretch for ten minutes"]
EVENT_TITLES = ["Budget review", "Team standup", "Dentist appointment", "Project kickoff", "Design critique",
                "Lunch with the interns", "Quarterly planning", "Yoga class", "Parent-teacher meeting",
                "Sprint retrospective", "Coffee chat", "Piano lesson", "Board meeting", "Code review session",
                "Customer demo", "Book club", "Car service", "Onboarding call", "Hackathon sync", "Vet visit",
                "Marketing sync", "Release planning", "Study group", "Tax consultation", "Wedding rehearsal"]
SUBJECTS = ["Lunch tomorrow", "Quarterly report", "Meeting notes", "Trip itinerary", "Invoice 2231", "Quick question",
            "Weekend plans", "Project update", "Birthday party", "New schedule", "Draft for review", "Thank you",
            "Office move", "Flight details", "Contract renewal", "Team dinner", "Password reset", "Holiday rota"]
BODIES = ["See you at noon.", "Please find the numbers attached.", "Can we move the call to Friday?",
          "The train leaves at 9.", "Thanks for your help today!", "Let me know what you think.",
          "I will be ten minutes late.", "The venue is booked.", "Don't forget the slides.",
          "Happy to help with the launch.", "The keys are under the mat.", "Dinner is on me this time.",
          "Please review the draft by Monday.", "The package arrived safely.", "Call me when you land."]
SONGS = ["Blue Horizon", "Midnight Train", "Paper Lanterns", "Golden Hour", "Salt and Honey", "Northern Lights",
         "Slow Dancing", "Velvet Rain", "City of Glass", "Wild Orchard", "Echoes", "Summer Static", "Iron Rivers",
         "Silver Lining", "Open Road", "Neon Garden", "Quiet Storm", "Lemon Trees", "After Hours", "Little Fires"]
GENRES = ["jazz", "lo-fi beats", "classical piano", "indie rock", "bossa nova", "techno", "folk", "hip hop",
          "ambient", "blues", "reggae", "synthwave", "baroque", "soul", "k-pop"]
RESTAURANT_WORDS = ["Olive", "Copper", "Lantern", "Saffron", "Harbor", "Juniper", "Basil", "Ember", "Fig", "Maple",
                    "Pepper", "Orchid", "Cedar", "Truffle", "Clover", "Marigold", "Sorrel", "Quince", "Anchor", "Thyme"]
RESTAURANT_KINDS = ["Bistro", "Kitchen", "Table", "Trattoria", "Grill", "Garden", "House", "Tavern", "Brasserie", "Diner"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK", "NOK", "DKK", "PLN", "CZK", "INR", "BRL",
              "MXN", "SGD", "KRW", "ZAR", "TRY", "NZD", "HKD", "CNY", "THB", "HUF"]
CONDITIONS = ["sunny", "partly cloudy", "overcast", "light rain", "heavy rain", "drizzle", "snow", "fog",
              "thunderstorms", "clear skies", "windy", "sleet", "hazy sunshine", "scattered showers"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]


# Words that open values are composed of (Pools(open_values=...)): titles, subjects, messages, tasks,
# songs, search topics and phrases no fixed list holds, so a model cannot get them right by recalling a
# list and has to copy them from the request.
NOUNS = """budget garden river harbor lantern ticket window bridge kitchen office report meeting parcel bicycle
ladder mirror candle blanket engine island forest valley market station library museum school theatre concert
picnic festival workshop seminar contract invoice payment salary pension mortgage insurance license passport
visa luggage suitcase camera laptop printer monitor keyboard battery charger cable router server database
backup website newsletter podcast playlist album guitar violin piano drum trumpet canvas sketch poster banner
fence roof chimney cellar attic balcony terrace hallway staircase elevator parking garage tractor trailer
harvest orchard vineyard meadow glacier canyon desert lagoon volcano lighthouse castle chapel tower fountain
statue compass anchor sail rudder paddle kayak tent torch backpack helmet jacket scarf glove boot sandal
recipe dessert pastry noodle dumpling salad omelette pancake waffle smoothie lemonade espresso teapot kettle
oven fridge freezer dishwasher blender toaster vacuum carpet curtain pillow sofa shelf drawer cabinet desk
lamp clock calendar diary notebook pencil marker stapler envelope stamp postcard puzzle chess kite balloon
rocket comet planet orbit satellite telescope microscope magnet crystal fossil pebble shell coral dolphin
falcon sparrow heron otter badger beaver rabbit turtle lizard hedgehog squirrel pony goat sheep donkey""".split()
ADJECTIVES = """quick quiet bright early late weekly monthly annual final urgent simple short long little big
green blue red golden silver yellow purple orange wooden copper crystal frozen sunny rainy windy stormy
cosy busy lazy happy lucky brave clever gentle fresh spicy sweet salty bitter smooth rough heavy light
ancient modern secret hidden open private public local global central northern southern eastern western
spare extra second third new old rusty shiny dusty noisy silent tiny giant wild calm friendly formal""".split()
VERBS = """fix clean buy sell call book check paint water feed wash fold pack sort repair replace return renew
cancel order print sign send collect deliver move lock open close charge update review prepare plan
measure weigh polish sharpen sweep recycle label scan copy file archive test install tune visit""".split()
PLACE_KINDS = ["shops", "cafés", "markets", "clubs", "parks", "tours", "classes", "studios", "fairs", "trails"]
TRANSLATION_ENDS = {"French": ["eau", "ette", "ier", "oir", "ance"], "Spanish": ["o", "a", "ito", "ero", "ada"],
                    "German": ["en", "ung", "er", "heit", "chen"], "Italian": ["ino", "etta", "one", "are", "ezza"]}


def _word(rng: random.Random, pool: list[str]) -> str:
    """A word from pool, now and then an invented one (lower case)."""
    return invented_word(rng, 2).lower() if rng.random() < 0.15 else rng.choice(pool)


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def open_title(rng: random.Random) -> str:
    a, n1, n2 = _word(rng, ADJECTIVES), _word(rng, NOUNS), _word(rng, NOUNS)
    return _cap(rng.choice([f"{a} {n1}", f"{n1} {n2}", f"{a} {n1} {n2}", f"{n1} review", f"{n1} and {n2}"]))


def open_subject(rng: random.Random) -> str:
    a, n1, n2 = _word(rng, ADJECTIVES), _word(rng, NOUNS), _word(rng, NOUNS)
    return _cap(rng.choice([f"{a} {n1}", f"{n1} {n2}", f"{n1} {rng.randint(2, 9999)}", f"about the {n1}",
                            f"{n1} for {n2}"]))


def open_body(rng: random.Random) -> str:
    a, n1, n2, v = _word(rng, ADJECTIVES), _word(rng, NOUNS), _word(rng, NOUNS), _word(rng, VERBS)
    day = rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "noon"])
    return rng.choice([f"The {n1} is {a}.", f"Please {v} the {n1} by {day}.", f"Can we {v} the {n1} on {day}?",
                       f"Don't forget the {a} {n1}.", f"The {n1} and the {n2} are ready.",
                       f"I left the {n1} next to the {n2}.", f"Bring the {n1}, please."])


def open_task(rng: random.Random) -> str:
    a, n1, n2, v = _word(rng, ADJECTIVES), _word(rng, NOUNS), _word(rng, NOUNS), _word(rng, VERBS)
    return rng.choice([f"{v} the {n1}", f"{v} the {a} {n1}", f"{v} {_a(n1)}", f"{v} the {n1} {n2}"])


def open_song(rng: random.Random) -> str:
    a, n1, n2 = _word(rng, ADJECTIVES), _word(rng, NOUNS), _word(rng, NOUNS)
    return " ".join(_cap(w) for w in rng.choice([f"{a} {n1}", f"{n1} of {n2}", f"the {a} {n1}", f"{n1}"]).split())


def open_topic(rng: random.Random) -> str:
    a, n1 = _word(rng, ADJECTIVES), _word(rng, NOUNS)
    return rng.choice([f"{n1} {rng.choice(PLACE_KINDS)}", f"{a} {n1} {rng.choice(PLACE_KINDS)}"])


def open_howto(rng: random.Random) -> str:
    a, n1, v = _word(rng, ADJECTIVES), _word(rng, NOUNS), _word(rng, VERBS)
    return rng.choice([f"{v} {_a(n1)}", f"{v} {_a(a)} {n1}", f"{v} my {n1}"])


def open_phrase(rng: random.Random) -> str:
    a, n1, n2, v = _word(rng, ADJECTIVES), _word(rng, NOUNS), _word(rng, NOUNS), _word(rng, VERBS)
    return rng.choice([f"the {n1} is {a}", f"where is the {n1}", f"I need {_a(n1)}", f"please {v} the {n1}",
                       f"the {n1} and the {n2}", f"my {n1} is {a}"])


def wild_value(rng: random.Random, words: tuple[str, ...]) -> str:
    """One to four words drawn from `words` (the corpus's own vocabulary, corpus.corpus_words) in any order, no
    template: unlike open values' list words, each may be one the model has strong habits for elsewhere ("Thanks
    asking calendar"), so after a space only a copy from the request gets the next word right."""
    return _cap(" ".join(rng.choice(words) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))


def wild_place(rng: random.Random, words: tuple[str, ...]) -> str:
    """A city name of one or two capitalised corpus words ("Weather Tomorrow")."""
    return " ".join(_cap(rng.choice(words)) for _ in range(rng.choice((1, 2, 2))))


def translation(phrase: str, language: str) -> str:
    """PHRASES' translation, or for an open phrase a made-up one: each word becomes an invented word with
    the language's endings (the same word always the same), so answers can quote what the tool returned."""
    if phrase in PHRASES:
        return PHRASES[phrase][language]
    out = []
    for w in phrase.split():
        r = random.Random(zlib.crc32(f"{language}:{w.lower()}".encode()))
        out.append(invented_word(r, 1).lower() + r.choice(TRANSLATION_ENDS[language]))
    return " ".join(out)


class Pools:
    """The entity values of one split, drawn with the caller's rng. With open_values > 0 that share of
    free-text values (titles, subjects, messages, tasks, songs, genres, topics, phrases) is composed
    afresh (open_title, ...) instead of drawn from the fixed lists; with 0 no extra random number is drawn,
    so the conversations are the same as they always were. With wild_values > 0 that share of the open values,
    and of the invented cities, is made of `words` in any order instead (wild_value, wild_place)."""

    def __init__(self, split: str, open_values: float = 0.0, wild_values: float = 0.0, words: tuple[str, ...] = ()):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        for name, share in (("open_values", open_values), ("wild_values", wild_values)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} is a share from 0 to 1, not {share}")
        if wild_values and not words:
            raise ValueError("wild values need words to be made of")
        self.split = split
        self.open_values = open_values
        self.wild_values = wild_values
        self.words = tuple(words)

        def own(values):
            mine = [v for v in values if split_of(v) == split]
            if not mine:
                raise RuntimeError(f"no {split} values in {values[:3]}...")
            return mine

        self.cities = own(CITIES)
        self.first_names = own(FIRST_NAMES)
        self.last_names = own(LAST_NAMES)
        self.domains = own(EMAIL_DOMAINS)
        self.phrases = own(list(PHRASES))
        self.topics = own(TOPICS)
        self.howto = own(HOWTO)
        self.tasks = own(TASKS)
        self.event_titles = own(EVENT_TITLES)
        self.subjects = own(SUBJECTS)
        self.bodies = own(BODIES)
        self.songs = own(SONGS)
        self.genres = own(GENRES)

    def _fresh(self, rng: random.Random, make) -> str:
        for _ in range(1000):
            value = make(rng)
            if split_of(value) == self.split:
                return value
        raise RuntimeError("no value of this split found")

    def _wild(self, rng: random.Random) -> bool:
        return bool(self.wild_values) and rng.random() < self.wild_values

    def _value(self, rng: random.Random, fixed: list[str], compose) -> str:
        if self.open_values and rng.random() < self.open_values:
            if self._wild(rng):
                return self._fresh(rng, lambda r: wild_value(r, self.words))
            return self._fresh(rng, compose)
        return rng.choice(fixed)

    def event_title(self, rng: random.Random) -> str:
        return self._value(rng, self.event_titles, open_title)

    def subject(self, rng: random.Random) -> str:
        return self._value(rng, self.subjects, open_subject)

    def body(self, rng: random.Random) -> str:
        return self._value(rng, self.bodies, open_body)

    def task(self, rng: random.Random) -> str:
        return self._value(rng, self.tasks, open_task)

    def song(self, rng: random.Random) -> str:
        return self._value(rng, self.songs, open_song)

    def genre(self, rng: random.Random) -> str:
        return self._value(rng, self.genres, lambda r: f"{_word(r, ADJECTIVES)} {r.choice(GENRES)}")

    def topic(self, rng: random.Random) -> str:
        return self._value(rng, self.topics, open_topic)

    def howto_task(self, rng: random.Random) -> str:
        return self._value(rng, self.howto, open_howto)

    def phrase(self, rng: random.Random) -> str:
        return self._value(rng, self.phrases, open_phrase)

    def city(self, rng: random.Random) -> str:
        if rng.random() < 0.3:
            if self._wild(rng):
                return self._fresh(rng, lambda r: wild_place(r, self.words))
            return self._fresh(rng, invented_place)
        return rng.choice(self.cities)

    def first_name(self, rng: random.Random) -> str:
        if rng.random() < 0.25:
            return self._fresh(rng, lambda r: invented_word(r, 2))
        return rng.choice(self.first_names)

    def last_name(self, rng: random.Random) -> str:
        if rng.random() < 0.25:
            return self._fresh(rng, lambda r: invented_word(r, rng.choice((2, 3))))
        return rng.choice(self.last_names)

    def person(self, rng: random.Random) -> str:
        return f"{self.first_name(rng)} {self.last_name(rng)}"

    def email(self, rng: random.Random) -> str:
        first, last = self.first_name(rng).lower(), self.last_name(rng).lower()
        local = rng.choice([f"{first}.{last}", f"{first}", f"{first[0]}{last}", f"{first}_{last}",
                            f"{first}{rng.randint(1, 99)}"])
        return f"{local}@{rng.choice(self.domains)}"

    def ticker(self, rng: random.Random) -> str:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        return self._fresh(rng, lambda r: "".join(r.choice(letters) for _ in range(r.choice((2, 3, 4, 4, 4)))))

    def restaurant(self, rng: random.Random) -> str:
        return self._fresh(rng, lambda r: f"{r.choice(RESTAURANT_WORDS)} {r.choice(RESTAURANT_KINDS)}"
                           if r.random() < 0.7 else f"{invented_word(r, 2)} {r.choice(RESTAURANT_KINDS)}")

    def code(self, rng: random.Random, prefix: str, digits: int = 4) -> str:
        return f"{prefix}{rng.randint(10 ** (digits - 1), 10 ** digits - 1)}"
