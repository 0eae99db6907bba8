"""Write data/probes/statements.jsonl: true and false statements in six topics for the truth probe.

The fact tables below were written by hand for this project. Each fact (subject, object) is
said in two templates of its topic; its false twin uses the same template with the object of
another fact of the same topic (a seeded choice, never the true object), so true and false
statements share their form and differ only in the swapped object.

    python data/probes/build_statements.py        # rewrites statements.jsonl (deterministic)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CITIES = """Paris France; Lyon France; Marseille France; Berlin Germany; Munich Germany; Hamburg Germany;
Madrid Spain; Barcelona Spain; Seville Spain; Rome Italy; Milan Italy; Naples Italy; Lisbon Portugal;
Porto Portugal; London England; Manchester England; Dublin Ireland; Edinburgh Scotland; Amsterdam the Netherlands;
Rotterdam the Netherlands; Brussels Belgium; Antwerp Belgium; Vienna Austria; Zurich Switzerland; Geneva Switzerland;
Stockholm Sweden; Oslo Norway; Copenhagen Denmark; Helsinki Finland; Warsaw Poland; Krakow Poland; Prague the Czech Republic;
Budapest Hungary; Athens Greece; Istanbul Turkey; Ankara Turkey; Moscow Russia; Saint Petersburg Russia; Kyiv Ukraine;
Bucharest Romania; Sofia Bulgaria; Belgrade Serbia; Zagreb Croatia; Cairo Egypt; Alexandria Egypt; Lagos Nigeria;
Nairobi Kenya; Casablanca Morocco; Marrakesh Morocco; Johannesburg South Africa; Cape Town South Africa; Accra Ghana;
Addis Ababa Ethiopia; Tokyo Japan; Osaka Japan; Kyoto Japan; Beijing China; Shanghai China; Shenzhen China; Seoul South Korea;
Busan South Korea; Mumbai India; Delhi India; Bangalore India; Karachi Pakistan; Lahore Pakistan; Dhaka Bangladesh;
Bangkok Thailand; Hanoi Vietnam; Jakarta Indonesia; Manila the Philippines; Kuala Lumpur Malaysia; Tehran Iran;
Baghdad Iraq; Riyadh Saudi Arabia; Dubai the United Arab Emirates; Sydney Australia; Melbourne Australia; Perth Australia;
Auckland New Zealand; Toronto Canada; Montreal Canada; Vancouver Canada; Chicago the United States; Boston the United States;
Houston the United States; Seattle the United States; Mexico City Mexico; Guadalajara Mexico; Havana Cuba; Bogota Colombia;
Lima Peru; Santiago Chile; Buenos Aires Argentina; Sao Paulo Brazil; Rio de Janeiro Brazil; Caracas Venezuela;
Quito Ecuador; Montevideo Uruguay; Reykjavik Iceland; Tallinn Estonia; Riga Latvia; Vilnius Lithuania"""

ELEMENTS = """hydrogen H; helium He; lithium Li; beryllium Be; boron B; carbon C; nitrogen N; oxygen O; fluorine F;
neon Ne; sodium Na; magnesium Mg; aluminium Al; silicon Si; phosphorus P; sulfur S; chlorine Cl; argon Ar;
potassium K; calcium Ca; scandium Sc; titanium Ti; vanadium V; chromium Cr; manganese Mn; iron Fe; cobalt Co;
nickel Ni; copper Cu; zinc Zn; gallium Ga; germanium Ge; arsenic As; selenium Se; bromine Br; krypton Kr;
rubidium Rb; strontium Sr; yttrium Y; zirconium Zr; niobium Nb; molybdenum Mo; technetium Tc; ruthenium Ru;
rhodium Rh; palladium Pd; silver Ag; cadmium Cd; indium In; tin Sn; antimony Sb; tellurium Te; iodine I;
xenon Xe; caesium Cs; barium Ba; lanthanum La; cerium Ce; neodymium Nd; samarium Sm; europium Eu; gadolinium Gd;
erbium Er; ytterbium Yb; hafnium Hf; tantalum Ta; tungsten W; rhenium Re; osmium Os; iridium Ir; platinum Pt;
gold Au; mercury Hg; thallium Tl; lead Pb; bismuth Bi; polonium Po; astatine At; radon Rn; francium Fr;
radium Ra; actinium Ac; thorium Th; uranium U; neptunium Np; plutonium Pu; americium Am; curium Cm;
einsteinium Es; fermium Fm; nobelium No; lawrencium Lr; praseodymium Pr; promethium Pm; terbium Tb;
dysprosium Dy; holmium Ho; thulium Tm; lutetium Lu; berkelium Bk; californium Cf"""

ANIMALS = {
    "mammal": "dog cat horse cow whale dolphin elephant lion tiger bear wolf fox rabbit mouse bat giraffe zebra "
              "kangaroo koala camel goat sheep pig deer otter",
    "bird": "eagle sparrow penguin ostrich owl parrot robin crow pigeon flamingo swan duck hawk falcon peacock "
            "pelican seagull heron vulture woodpecker",
    "reptile": "snake lizard crocodile alligator turtle tortoise iguana gecko chameleon cobra python "
               "rattlesnake komodo dragon anaconda",
    "amphibian": "frog toad salamander newt axolotl bullfrog caecilian",
    "fish": "salmon trout shark tuna cod goldfish carp catfish herring sardine eel pike perch mackerel "
            "swordfish anchovy",
    "insect": "ant bee wasp butterfly moth beetle ladybug mosquito fly grasshopper cricket cockroach dragonfly "
              "termite flea",
}

INVENTIONS = """telephone|Alexander Graham Bell; light bulb|Thomas Edison; phonograph|Thomas Edison;
printing press|Johannes Gutenberg; steam engine|James Watt; airplane|the Wright brothers; World Wide Web|Tim Berners-Lee;
radio|Guglielmo Marconi; dynamite|Alfred Nobel; telegraph|Samuel Morse; cotton gin|Eli Whitney;
polio vaccine|Jonas Salk; mechanical reaper|Cyrus McCormick; revolver|Samuel Colt; sewing machine|Elias Howe;
Braille alphabet|Louis Braille; diesel engine|Rudolf Diesel; jet engine|Frank Whittle; television|John Logie Baird;
lightning rod|Benjamin Franklin; bifocal glasses|Benjamin Franklin; periodic table|Dmitri Mendeleev;
safety razor|King Camp Gillette; ballpoint pen|Laszlo Biro; hovercraft|Christopher Cockerell;
vulcanized rubber|Charles Goodyear; analytical engine|Charles Babbage; alternating current motor|Nikola Tesla;
Tesla coil|Nikola Tesla; kinetoscope|Thomas Edison; smallpox vaccine|Edward Jenner; stethoscope|Rene Laennec;
pasteurization|Louis Pasteur; Geiger counter|Hans Geiger; Rubik's Cube|Erno Rubik; Java language|James Gosling;
Python language|Guido van Rossum; Linux kernel|Linus Torvalds; C language|Dennis Ritchie; mercury thermometer|Daniel Fahrenheit;
electric battery|Alessandro Volta; spinning jenny|James Hargreaves; flying shuttle|John Kay;
seed drill|Jethro Tull; miner's safety lamp|Humphry Davy; Bunsen burner|Robert Bunsen;
centigrade scale|Anders Celsius; pendulum clock|Christiaan Huygens; reflecting telescope|Isaac Newton;
movable type in Europe|Johannes Gutenberg; Morse code|Samuel Morse; Macintosh computer|Steve Jobs and his team;
theory of relativity|Albert Einstein; penicillin|Alexander Fleming; X-ray image|Wilhelm Rontgen;
barometer|Evangelista Torricelli; hydraulic press|Joseph Bramah; paper chromatography|Archer Martin;
lithium-ion battery|John Goodenough; Post-it note|Spencer Silver; Velcro fastener|George de Mestral;
frisbee|Walter Morrison; zipper|Whitcomb Judson; typewriter|Christopher Sholes; elevator brake|Elisha Otis;
Polaroid camera|Edwin Land; microwave oven|Percy Spencer; monopoly board game|Elizabeth Magie;
Kevlar fibre|Stephanie Kwolek; saxophone|Adolphe Sax; jacquard loom|Joseph Marie Jacquard;
hot air balloon|the Montgolfier brothers; parachute|Andre-Jacques Garnerin; daguerreotype|Louis Daguerre;
calculus|Isaac Newton; laws of heredity|Gregor Mendel; thermos flask|James Dewar; Dewar flask|James Dewar;
pneumatic tyre|John Boyd Dunlop; Gatling gun|Richard Gatling; slide rule|William Oughtred;
logarithm|John Napier; Yale lock|Linus Yale; escalator|Jesse Reno; cash register|James Ritty"""

COMPANIES = """Apple|the iPhone; Microsoft|Windows; Google|the Android operating system; Amazon|the Kindle;
Samsung|Galaxy phones; Sony|the PlayStation; Nintendo|the Switch console; Toyota|the Corolla; Ford|the Mustang;
Boeing|the 747 jumbo jet; Airbus|the A380; Tesla|the Model S; Coca-Cola|Sprite; PepsiCo|Doritos;
Nike|Air Jordan sneakers; Adidas|Stan Smith sneakers; Lego|plastic building bricks; IKEA|flat-pack furniture;
Intel|Pentium processors; Nvidia|GeForce graphics cards; Adobe|Photoshop; Oracle|its database software;
Netflix|streaming video; Spotify|streaming music; Canon|digital cameras; Nikon|camera lenses;
Volkswagen|the Beetle; BMW|the Mini; Ferrari|red sports cars; Harley-Davidson|motorcycles;
Rolex|luxury watches; Gillette|razors; Colgate|toothpaste; Heinz|tomato ketchup; Kellogg's|corn flakes;
Nestle|Nescafe coffee; Mars|M&M's; Hershey|chocolate bars; Levi Strauss|blue jeans; Crayola|crayons;
Mattel|Barbie dolls; Hasbro|the Monopoly game; Dyson|bagless vacuum cleaners; Bic|ballpoint pens;
Zippo|lighters; Kodak|photographic film; Xerox|photocopiers; Nokia|mobile phones; BlackBerry|email phones;
Facebook|a social network; Twitter|short posts called tweets; Uber|ride hailing; Airbnb|home rentals;
Starbucks|coffee drinks; McDonald's|the Big Mac; Burger King|the Whopper; KFC|fried chicken;
Domino's|pizza delivery; Red Bull|energy drinks; Michelin|tyres; Goodyear|tyres and blimps; Yamaha|pianos;
Fender|electric guitars; Steinway|grand pianos; Embraer|regional jets; Lockheed Martin|the F-35 fighter;
Honda|the Civic; Nissan|the Leaf; Volvo|safe family cars; Porsche|the 911; Jeep|off-road vehicles;
Caterpillar|bulldozers; John Deere|tractors; Pfizer|vaccines and medicines; Bayer|aspirin;
Johnson & Johnson|baby shampoo; Duracell|batteries; Philips|light bulbs; Panasonic|home electronics;
Casio|digital watches and calculators; Texas Instruments|graphing calculators; Garmin|GPS devices;
GoPro|action cameras; Fitbit|fitness trackers; Logitech|computer mice; Wrigley|chewing gum;
Tabasco|hot pepper sauce; Swatch|plastic watches; Victorinox|Swiss Army knives; Tupperware|plastic food containers"""

# general facts: groups of (template, [(subject, object)]); objects swap within a group
GENERAL = [
    ("The colour of {s} is {o}.", "grass|green; the sky on a clear day|blue; snow|white; coal|black; a ripe banana|yellow;"
     " a ripe tomato|red; an orange|orange; milk|white; charcoal|black; a lemon|yellow; blood|red; a lime|green;"
     " an emerald|green; a ruby|red; a sapphire|blue; chocolate|brown; soil|brown; ivory|white; a flamingo|pink"),
    ("A {s} has {o}.", "week|seven days; year|twelve months; day|twenty-four hours; hour|sixty minutes; minute|sixty seconds;"
     " triangle|three sides; square|four sides; hexagon|six sides; octagon|eight sides; pentagon|five sides;"
     " spider|eight legs; insect|six legs; dog|four legs; human hand|five fingers; decade|ten years; century|one hundred years;"
     " dozen|twelve items; pair|two items; bicycle|two wheels; tricycle|three wheels; car|four wheels;"
     " leap year|three hundred and sixty-six days; chessboard|sixty-four squares; octopus|eight arms"),
    ("The opposite of {s} is {o}.", "hot|cold; up|down; left|right; day|night; big|small; fast|slow; happy|sad;"
     " open|closed; light|dark; wet|dry; early|late; hard|soft; full|empty; old|new; rich|poor; love|hate;"
     " win|lose; north|south; east|west; above|below; strong|weak; loud|quiet; thick|thin; tall|short"),
    ("The planet {s} is {o}.", "Mercury|closest to the Sun; Jupiter|the largest in the solar system; Mars|known as the red planet;"
     " Saturn|famous for its bright rings; Earth|the third planet from the Sun; Venus|the hottest planet;"
     " Neptune|the farthest planet from the Sun; Uranus|tilted on its side"),
    ("The main language of {s} is {o}.", "Brazil|Portuguese; Mexico|Spanish; Japan|Japanese; Germany|German; France|French;"
     " Italy|Italian; Russia|Russian; China|Mandarin Chinese; Greece|Greek; Turkey|Turkish; Poland|Polish;"
     " the Netherlands|Dutch; Sweden|Swedish; Egypt|Arabic; Iran|Persian; Thailand|Thai; Vietnam|Vietnamese;"
     " South Korea|Korean; Finland|Finnish; Hungary|Hungarian; Argentina|Spanish; Portugal|Portuguese"),
    ("Water {s} at {o}.", "freezes|zero degrees Celsius; boils at sea level|one hundred degrees Celsius"),
    ("The {s} is the organ that {o}.", "heart|pumps blood; lung|takes in air; stomach|digests food; kidney|filters blood;"
     " brain|controls thinking; eye|senses light; ear|senses sound; skin|covers the body; liver|cleans the blood of toxins;"
     " nose|senses smells; tongue|senses taste; bladder|stores urine"),
    ("The currency of {s} is the {o}.", "Japan|yen; the United Kingdom|pound; the United States|dollar; India|rupee;"
     " China|yuan; Russia|rouble; Mexico|peso; Switzerland|franc; South Korea|won; Brazil|real; Poland|zloty;"
     " Turkey|lira; Sweden|krona; Thailand|baht; South Africa|rand; Israel|shekel"),
    ("The author of {s} is {o}.", "Hamlet|William Shakespeare; Pride and Prejudice|Jane Austen; War and Peace|Leo Tolstoy;"
     " Don Quixote|Miguel de Cervantes; Oliver Twist|Charles Dickens; The Odyssey|Homer; Moby-Dick|Herman Melville;"
     " Ulysses|James Joyce; Frankenstein|Mary Shelley; Dracula|Bram Stoker; Nineteen Eighty-Four|George Orwell;"
     " Crime and Punishment|Fyodor Dostoevsky; The Divine Comedy|Dante Alighieri; Faust|Johann Wolfgang von Goethe;"
     " Les Miserables|Victor Hugo; The Hobbit|J. R. R. Tolkien"),
    ("A young {s} is called a {o}.", "dog|puppy; cat|kitten; cow|calf; horse|foal; sheep|lamb; frog|tadpole; swan|cygnet;"
     " kangaroo|joey; bear|cub; deer|fawn; goose|gosling; duck|duckling; hen|chick"),
]

TOPICS = {
    "cities": ("{s} is a city in {o}.", "The city of {s} is located in {o}."),
    "elements": ("The chemical symbol for {s} is {o}.", "The element {s} has the symbol {o}."),
    "animals": ("The {s} is a {o}.", "A {s} is a kind of {o}."),
    "inventions": ("The {s} was invented by {o}.", "The inventor of the {s} was {o}."),
    "companies": ("{s} is known for {o}.", "The company {s} makes {o}."),
}


def _pairs(text: str, sep: str | None = None) -> list[tuple[str, str]]:
    out = []
    for part in text.replace("\n", " ").split(";"):
        part = part.strip()
        if not part:
            continue
        if sep:
            s, o = part.split(sep)
        else:
            s, o = part.split(" ", 1)
        out.append((s.strip(), o.strip()))
    return out


def _cities() -> list[tuple[str, str]]:
    # a city's name may have several words: the country starts at the first word that begins one
    countries = ["the United States", "the United Arab Emirates", "the Czech Republic", "the Netherlands",
                 "the Philippines", "South Africa", "South Korea", "Saudi Arabia", "New Zealand"]
    out = []
    for part in CITIES.replace("\n", " ").split(";"):
        part = part.strip()
        match = [c for c in countries if part.endswith(" " + c)]
        country = match[0] if match else part.rsplit(" ", 1)[1]
        out.append((part[: -len(country)].strip(), country))
    return out


def facts() -> dict[str, list[tuple[str, str, str]]]:
    """topic -> [(template, subject, object)] (objects swap among facts of one template group)."""
    tables = {"cities": _cities(), "elements": _pairs(ELEMENTS),
              "animals": [(a, c) for c, names in ANIMALS.items() for a in _animals(names)],
              "inventions": _pairs(INVENTIONS, "|"), "companies": _pairs(COMPANIES, "|")}
    out = {t: [(tpl, s, o) for tpl in TOPICS[t] for s, o in rows] for t, rows in tables.items()}
    out["general"] = [(tpl, s, o) for tpl, rows in GENERAL for s, o in _pairs(rows, "|")]
    return out


def _animals(names: str) -> list[str]:
    words = names.split()
    joined = []
    for w in words:   # "komodo dragon" is one animal
        if joined and joined[-1] == "komodo":
            joined[-1] += " " + w
        else:
            joined.append(w)
    return joined


def _article(text: str) -> str:
    """'The {s} is a {o}.' reads 'an' before a vowel."""
    for vowel in "aeiou":
        text = text.replace(f" a {vowel}", f" an {vowel}")
    return text


def statements(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for topic, items in facts().items():
        for tpl, s, o in items:
            pool = sorted({oo for t2, _, oo in items if t2 == tpl and oo != o})
            wrong = rng.choice(pool)
            for label, obj in ((1, o), (0, wrong)):
                text = tpl.format(s=s, o=obj)
                text = text[0].upper() + text[1:]
                rows.append({"text": _article(text) if topic == "animals" else text, "label": label, "topic": topic})
    return rows


def main() -> None:
    path = Path(__file__).with_name("statements.jsonl")
    rows = statements()
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = {}
    for r in rows:
        counts.setdefault(r["topic"], [0, 0])[r["label"]] += 1
    print(path, {t: {"true": c[1], "false": c[0]} for t, c in counts.items()})


if __name__ == "__main__":
    main()
