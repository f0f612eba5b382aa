"""Built-in word lists and templates: English read speech, and Chinese/Spanish/Arabic/German/French with English.

English vocabulary is part hand-written (concrete nouns, verbs, places: the words templates need in a
given role) and part drawn from `wordfreq`'s frequency list by suffix (abstract nouns in -tion/-ment/
-ness/-ity, adjectives in -ous/-ful/-ive/-able/-ical, adverbs in -ly whose stem is one of those
adjectives), which widens the vocabulary without a tagger. The code-switched templates imitate
conversational corpora: SEAME (Singapore/Malaysia Mandarin-English), Fisher Spanish-English and ArzEn
(Egyptian Arabic-English), where English nouns, verbs and short phrases are embedded in the matrix
sentence.
"""

from __future__ import annotations

from functools import lru_cache

from pyro_blora.testbed.grammar import CodeSwitchSpec
from pyro_blora.testbed.languages import LanguagePair

__all__ = ["english_spec", "builtin_spec", "BUILTIN_PAIRS", "EMBEDDED_ENGLISH"]

# English words and phrases embedded in other languages, by slot.
EMBEDDED_ENGLISH: dict[str, tuple[str, ...]] = {
    "N": (
        "meeting", "project", "deadline", "presentation", "email", "report", "budget", "interview", "assignment",
        "laptop", "password", "schedule", "feedback", "proposal", "contract", "slides", "website", "database",
        "update", "group project", "final exam", "weekend plan", "team building", "job offer", "appointment",
        "homework", "quiz", "lecture", "internship", "salary", "overtime", "application", "spreadsheet",
    ),
    "V": (
        "check", "prepare", "finish", "discuss", "review", "confirm", "cancel", "send", "print", "update",
        "download", "submit", "present", "book", "follow up", "double check", "print out", "reschedule",
    ),
    "ADJ": (
        "busy", "tired", "nice", "boring", "difficult", "simple", "important", "convenient", "stressful", "cool",
        "expensive", "crazy", "weird", "awesome", "super busy", "really good",
    ),
    "TIME": ("tomorrow", "tonight", "next week", "this weekend", "later", "after lunch", "next Monday", "last minute"),
    "PLACE": ("office", "library", "canteen", "mall", "lab", "gym", "campus", "hotel", "airport"),
    "PERSON": ("my boss", "the manager", "my professor", "my colleague", "the tutor", "the client", "my roommate", "HR"),
}

# --- English read speech (Piper) -------------------------------------------------------------------

_NAMES = (
    "Anna", "David", "Maria", "James", "Sarah", "Peter", "Emma", "Daniel", "Laura", "Thomas", "Helen", "Robert",
    "Alice", "George", "Julia", "Michael", "Kate", "Simon", "Rachel", "Oliver",
)
_PEOPLE = (
    "teacher", "doctor", "driver", "farmer", "neighbor", "student", "manager", "nurse", "baker", "pilot",
    "engineer", "writer", "painter", "lawyer", "chef", "captain", "guard", "singer", "scientist", "soldier",
)
_THINGS = (
    "book", "letter", "bottle", "chair", "table", "window", "garden", "bridge", "river", "boat", "train", "horse",
    "camera", "bicycle", "basket", "candle", "coat", "door", "engine", "map", "mirror", "piano", "radio", "ticket",
    "umbrella", "wallet", "key", "box", "cup", "lamp", "ladder", "kettle", "blanket", "picture", "phone", "clock",
    "apple", "orange", "sandwich", "cake", "bag", "jacket", "truck", "machine", "tree", "flower", "stone", "shell",
)
_PLACES = (
    "the station", "the market", "the library", "the harbor", "the old church", "the hospital", "the school",
    "the village", "the museum", "the bakery", "the park", "the beach", "the airport", "the office", "the hotel",
    "the kitchen", "the forest", "the farm", "the city center", "the post office", "the theater", "the island",
)
_TIMES = (
    "yesterday", "this morning", "last night", "on Monday", "after lunch", "before dinner", "every Sunday",
    "in the spring", "last winter", "at noon", "early today", "on Friday evening", "next week", "tomorrow",
)
_SIMPLE_ADJECTIVES = (
    "old", "new", "small", "large", "quiet", "bright", "heavy", "cold", "warm", "green", "red", "blue", "yellow",
    "broken", "empty", "clean", "strange", "famous", "simple", "quick", "slow", "soft", "loud", "narrow", "wide",
    "young", "tall", "short", "dark", "fresh", "busy", "tired", "happy", "sad", "brave", "careful", "gentle",
)
_VERBS_PAST = (
    "found", "carried", "painted", "opened", "closed", "bought", "sold", "cleaned", "fixed", "moved", "lost",
    "watched", "noticed", "borrowed", "brought", "dropped", "packed", "repaired", "wrapped", "collected",
    "described", "visited", "followed", "checked", "washed", "filled", "counted", "pushed", "pulled", "showed",
)
_VERBS_BASE = (
    "find", "carry", "paint", "open", "close", "buy", "sell", "clean", "fix", "move", "watch", "borrow", "bring",
    "pack", "repair", "wrap", "collect", "describe", "visit", "check", "wash", "fill", "count", "push", "show",
)
_VERBS_INTRANSITIVE_PAST = (
    "laughed", "waited", "smiled", "arrived", "left", "slept", "worked", "listened", "walked", "stayed", "rested",
    "returned", "danced", "shouted", "agreed", "disappeared", "complained", "hurried",
)

_ENGLISH_TEMPLATES = (
    "{NAME} {VPAST} the {ADJ} {THING} {TIME}.",
    "The {PERSON} {VPAST} a {THING} near {PLACE}.",
    "{NAME} and the {PERSON} {VINTR} at {PLACE}.",
    "Have you seen the {ADJ} {THING} that {NAME} {VPAST}?",
    "We should {VBASE} the {THING} before {TIME2}.",
    "The {ADJ} {PERSON} {VINTR} {ADV}.",
    "{TIME_CAP}, {NAME} {VPAST} the {THINGS} at {PLACE}.",
    "Please {VBASE} the {ADJ} {THINGS} for the {PERSON}.",
    "Nobody knew why the {PERSON} {VPAST} the {THING}.",
    "There was a {ADJ} {THING} on the {THING2} in {PLACE}.",
    "The {ABSTRACT} of the {THING} surprised the {PERSON}.",
    "{NAME} spoke about {ABSTRACT} and {ABSTRACT2} {TIME}.",
    "I think the {PERSON} {VPAST} my {THING}.",
    "Why did {NAME} {VBASE} the {ADJ} {THING}?",
    "If the {THING} is {ADJ}, we can {VBASE} it {TIME2}.",
    "The {THINGS} in {PLACE} were {ADJ} and {ADJ2}.",
    "A {ADJ} {PERSON} {VINTR} outside {PLACE}.",
    "My {PERSON} {ADV} {VPAST} the {THING}.",
    "Where did you {VBASE} the {THINGS} {TIME}?",
    "{NAME} asked the {PERSON} to {VBASE} the {THING}.",
    "The report describes the {ABSTRACT} of the project in detail.",
    "Everyone {VINTR} when the {PERSON} {VPAST} the {THING}.",
    "Her {ADJ} {THING} was {ADJ2} after the storm.",
    "We {VINTR} at {PLACE} until the {PERSON} {VINTR2}.",
    "The {PERSON} said the {ABSTRACT} was {DERIVED_ADJ}.",
    "It was a {DERIVED_ADJ} {ABSTRACT}, according to {NAME}.",
    "Could you {VBASE} my {THING} while I am at {PLACE}?",
    "{NAME} {ADV} {VPAST} a {THING} for the {PERSON}.",
    "Two {PEOPLE} {VPAST} the {ADJ} {THINGS} {TIME}.",
    "After the {ABSTRACT}, {NAME} {VINTR} {ADV}.",
    "The {THING} and the {THING2} belong to the {PERSON}.",
    "I never {VPAST} a {THING} so {ADJ}.",
    "When did the {PEOPLE} {VBASE} the {THINGS}?",
    "{NAME} prefers the {ADJ} {THING} to the {ADJ2} one.",
    "The museum shows how {DERIVED_ADJ} {ABSTRACT} can be.",
    "Our {PERSON} keeps a {ADJ} {THING} in {PLACE}.",
    "They {VPAST} every {THING} in {PLACE} {TIME}.",
    "Without the {THING}, the {PERSON} {VINTR} {ADV}.",
    "The {ADJ} {THINGS} {VINTR} on the shelf.",
    "{NAME} wrote a letter about the {ABSTRACT} of {PLACE}.",
    "This {THING} is more {DERIVED_ADJ} than that {THING2}.",
    "The {PEOPLE} were {ADV} {DERIVED_ADJ} about the {ABSTRACT}.",
    "Do you remember the {ADJ} {PERSON} from {PLACE}?",
    "{NAME} {VINTR} because the {THING} was {ADJ}.",
    "Each {PERSON} must {VBASE} one {THING} {TIME2}.",
    "The {ABSTRACT} of {NAME} made the {PERSON} {ADJ}.",
    "A {THING} fell from the {THING2} and {NAME} {VINTR}.",
    "Let us {VBASE} the {THINGS} and go to {PLACE}.",
    "{NAME} {VPAST} the {THING}, and then {NAME2} {VPAST2} it.",
    "The {DERIVED_ADJ} {PERSON} {ADV} {VPAST} the {ABSTRACT}.",
    "Somebody left a {ADJ} {THING} at {PLACE} {TIME}.",
    "Is the {THING} in {PLACE} still {ADJ}?",
    "Most {PEOPLE} {VINTR} {ADV} after the {ABSTRACT}.",
    "The {PERSON} could not {VBASE} the {ADJ} {THING}.",
    "{NAME} said that the {THINGS} were {DERIVED_ADJ}.",
    "On the way to {PLACE}, {NAME} {VPAST} a {ADJ} {THING}.",
    "Our {ABSTRACT} depends on the {ADJ} {PERSON}.",
    "The {THINGS} {VINTR} {ADV} in the wind.",
    "Tell the {PERSON} that the {THING} is {ADJ}.",
    "What a {DERIVED_ADJ} {THING}, said {NAME}.",
)

_ABSTRACT_SUFFIXES = ("tion", "ment", "ness", "ity", "ance", "ence")
_ADJECTIVE_SUFFIXES = ("ous", "ful", "ive", "able", "ible", "ical")


@lru_cache(maxsize=4)
def _wordfreq_vocabulary(n: int = 15000, per_class: int = 120) -> dict[str, tuple[str, ...]]:
    """Abstract nouns, adjectives and -ly adverbs from the `n` most frequent English words, by suffix."""
    try:
        import wordfreq
    except ImportError as err:
        raise ImportError("the English sentence generator needs `wordfreq`; `pip install wordfreq`") from err
    words = [w for w in wordfreq.top_n_list("en", n) if w.isascii() and w.isalpha() and len(w) >= 6]
    abstract = [w for w in words if w.endswith(_ABSTRACT_SUFFIXES) and not w.endswith("ities")]
    adjectives = [w for w in words if w.endswith(_ADJECTIVE_SUFFIXES)]
    stems = set(adjectives) | set(_SIMPLE_ADJECTIVES)
    adverbs = [
        w for w in words
        if w.endswith("ly") and (w[:-2] in stems or (w.endswith("ily") and w[:-3] + "y" in stems)
                                 or (w.endswith("ably") and w[:-1] + "e" in stems))
    ]
    return {"ABSTRACT": tuple(abstract[:per_class]), "DERIVED_ADJ": tuple(adjectives[:per_class]),
            "ADV": tuple(adverbs[:per_class])}


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith("f"):
        return noun[:-1] + "ves"
    return noun + "s"


@lru_cache(maxsize=1)
def english_spec() -> CodeSwitchSpec:
    """Monolingual English read-speech sentences for the Piper voice."""
    derived = _wordfreq_vocabulary()
    adjectives = _SIMPLE_ADJECTIVES + derived["DERIVED_ADJ"][:40]
    words = {
        "NAME": _NAMES, "NAME2": _NAMES, "PERSON": _PEOPLE, "PEOPLE": tuple(_plural(p) for p in _PEOPLE if p != "chef") + ("chefs",),
        "THING": _THINGS, "THING2": _THINGS, "THINGS": tuple(_plural(t) for t in _THINGS),
        "PLACE": _PLACES, "TIME": _TIMES, "TIME2": _TIMES[-6:] + ("the weekend", "dinner", "noon", "the holidays"),
        "TIME_CAP": tuple(t[0].upper() + t[1:] for t in _TIMES),
        "ADJ": adjectives, "ADJ2": adjectives, "VPAST": _VERBS_PAST, "VPAST2": _VERBS_PAST, "VBASE": _VERBS_BASE,
        "VINTR": _VERBS_INTRANSITIVE_PAST, "VINTR2": _VERBS_INTRANSITIVE_PAST,
        "ABSTRACT": derived["ABSTRACT"], "ABSTRACT2": derived["ABSTRACT"],
        "DERIVED_ADJ": derived["DERIVED_ADJ"], "ADV": derived["ADV"],
    }
    return CodeSwitchSpec(pair=LanguagePair("en", None), templates=_ENGLISH_TEMPLATES, matrix_words=words)


# --- Mandarin-English (SEAME-like) -----------------------------------------------------------------

_ZH_WORDS = {
    "N": ("报告", "项目", "会议", "作业", "考试", "文件", "合同", "计划", "预算", "邮件", "面试", "论文", "方案", "课程", "表格"),
    "V": ("检查", "准备", "完成", "讨论", "修改", "确认", "取消", "发送", "打印", "更新", "下载", "提交"),
    "ADJ": ("忙", "累", "好", "烦", "难", "简单", "重要", "方便", "麻烦", "贵", "无聊", "厉害"),
    "TIME": ("明天", "今天下午", "下个星期", "周末", "晚上", "后天", "下午", "星期五"),
    "PLACE": ("办公室", "图书馆", "学校", "食堂", "公司", "商场", "实验室", "机场", "酒店"),
    "PERSON": ("老板", "老师", "同事", "经理", "我妈", "教授", "客户", "室友"),
}
_ZH_TEMPLATES = (
    "我{TIME}要{V}这个{N}。",
    "你有没有{V}那个{N}？",
    "我们的{N}{TIME}要交给{PERSON}。",
    "这个{N}真的很{ADJ}。",
    "{PERSON}说{TIME}的{N}取消了。",
    "我觉得这个{N}有点{ADJ}。",
    "你可以帮我{V}一下{N}吗？",
    "{TIME}我们在{PLACE}见面吧。",
    "我还没有{V}我的{N}，怎么办？",
    "他每天都在{PLACE}做{N}。",
    "如果{PERSON}不同意，我们就要重新{V}{N}。",
    "我刚刚收到一个{N}，是{PERSON}发的。",
    "这个星期太{ADJ}了，我没有时间{V}。",
    "你知道{PLACE}几点关门吗？",
    "我们先{V}{N}，然后再去{PLACE}。",
    "你的{N}做得很{ADJ}。",
    "{PERSON}让我{TIME}之前{V}完。",
    "我不太懂这个{N}是什么意思。",
    "其实那个{N}没有那么{ADJ}。",
    "他们在{PLACE}讨论{N}的问题。",
    "我忘了带{N}，可以借你的吗？",
    "为什么{PERSON}还没有回复我的{N}？",
    "我们{TIME}一起去{PLACE}好不好？",
    "听说{N}又要改了，真的很{ADJ}。",
    "我妈妈觉得{PLACE}的东西很{ADJ}。",
    "请你{TIME}把{N}{V}好。",
    "那个{PERSON}人很{ADJ}，大家都喜欢他。",
    "你先去{PLACE}等我，我马上{V}完{N}就来。",
    "这次的{N}比上次{ADJ}多了。",
    "{TIME}的{N}要不要先{V}一下？",
    "我在{PLACE}的时候碰到了{PERSON}。",
    "大家都在等{PERSON}的{N}。",
    "我已经{V}了三次，还是不行。",
    "要是{N}来不及，就跟{PERSON}说一声。",
    "我们组的{N}是我负责的。",
    "最近{PLACE}人太多了，很{ADJ}。",
)

# --- Spanish-English (Fisher-like) ---------------------------------------------------------------------

_ES_WORDS = {
    "Nm": ("trabajo", "proyecto", "examen", "reporte", "horario", "carro", "celular", "partido", "programa", "correo", "contrato", "viaje"),
    "Nf": ("reunión", "tarea", "clase", "fiesta", "computadora", "entrevista", "presentación", "cita", "película", "cuenta", "junta"),
    "V": ("terminar", "revisar", "mandar", "preparar", "cancelar", "llamar", "comprar", "arreglar", "entregar", "imprimir", "confirmar"),
    "ADJ": ("importante", "difícil", "fácil", "interesante", "increíble", "horrible", "normal", "grande", "caro", "aburrido"),
    "TIME": ("mañana", "el sábado", "esta noche", "la próxima semana", "ahorita", "después del trabajo", "el lunes", "en la tarde"),
    "PERSON": ("mi jefe", "mi hermana", "la maestra", "mi primo", "mi novio", "mi mamá", "el doctor", "mi compañero"),
}
_ES_TEMPLATES = (
    "Voy a {V} el {Nm} {TIME}.",
    "¿Ya terminaste la {Nf}?",
    "La {Nf} estuvo muy {ADJ}.",
    "{PERSON} me dijo que el {Nm} era {ADJ}.",
    "No puedo ir porque tengo una {Nf} {TIME}.",
    "Oye, ¿tú sabes si {PERSON} va a {V} la {Nf}?",
    "Tengo que {V} el {Nm} antes de {TIME}.",
    "Es que el {Nm} está bien {ADJ}, ¿sabes?",
    "Mi hermano siempre deja la {Nf} para {TIME}.",
    "¿Por qué no le dices a {PERSON} que te ayude con el {Nm}?",
    "Ayer tuvimos una {Nf} y fue {ADJ}.",
    "Yo creo que {PERSON} no quiere {V} nada.",
    "Necesito {V} la {Nf} y después {V} el {Nm}.",
    "Bueno, {TIME} hablamos de la {Nf}.",
    "Lo malo es que el {Nm} sale muy {ADJ}.",
    "¿Me puedes {V} el {Nm} por favor?",
    "Pues yo estaba en la {Nf} cuando llamó {PERSON}.",
    "A mí me gusta mucho la {Nf}, pero es {ADJ}.",
    "Si no terminas el {Nm}, {PERSON} se va a enojar.",
    "Todavía no sé si voy a {V} la {Nf}.",
    "Mira, el {Nm} de {PERSON} es más {ADJ} que el mío.",
    "Dice {PERSON} que {TIME} hay {Nf}.",
    "Ya le mandé el {Nm} a {PERSON}.",
    "Nosotros siempre vamos a la {Nf} {TIME}.",
    "O sea, la {Nf} no era tan {ADJ}.",
    "Cuando llegues, hay que {V} la {Nf}.",
    "Se me olvidó {V} el {Nm}, qué pena.",
    "¿Y qué pasó con la {Nf} de {PERSON}?",
    "Yo pensé que el {Nm} era para {TIME}.",
    "Estoy muy cansada por el {Nm} de {PERSON}.",
    "La verdad, {V} todo eso es {ADJ}.",
    "Primero vamos a {V} la {Nf} y luego comemos.",
    "¿Cuánto te costó el {Nm}?",
    "Fíjate que {PERSON} perdió su {Nm} otra vez.",
    "No me acuerdo dónde dejé la {Nf}.",
    "Me encantó la {Nf}, estuvo súper {ADJ}.",
)

# --- Egyptian Arabic-English (ArzEn-like) ----------------------------------------------------------------

_AR_WORDS = {
    "N": ("اجتماع", "مشروع", "امتحان", "تقرير", "شغل", "محاضرة", "مقابلة", "ميعاد", "عرض", "ورقة", "بحث", "كورس"),
    "V": ("أخلص", "أراجع", "أبعت", "أجهز", "ألغي", "أكلم", "أسلم", "أطبع", "أحجز", "أشوف"),
    "ADJ": ("صعب", "سهل", "حلو", "مهم", "وحش", "غريب", "ممل", "كويس", "غالي", "متعب"),
    "TIME": ("بكرة", "النهارده", "الأسبوع الجاي", "بالليل", "بعد الضهر", "يوم الخميس", "الصبح"),
    "PLACE": ("الشغل", "الجامعة", "المكتب", "البيت", "الكلية", "النادي", "المعمل", "الشركة"),
    "PERSON": ("الدكتور", "المدير", "صاحبي", "أختي", "مامتي", "زميلي", "العميل", "المعيد"),
}
_AR_TEMPLATES = (
    "أنا عندي {N} {TIME}.",
    "لازم {V} ال{N} ده قبل {TIME}.",
    "ال{N} كان {ADJ} جدا النهارده.",
    "{PERSON} قال إن ال{N} اتلغى.",
    "إنت خلصت ال{N} ولا لسه؟",
    "أنا رايح {PLACE} {TIME} عشان {N}.",
    "بصراحة ال{N} ده {ADJ} أوي.",
    "ممكن تساعدني {V} ال{N}؟",
    "{PERSON} مستنيني في {PLACE}.",
    "مش عارف {V} إزاي، الموضوع {ADJ}.",
    "إحنا اتكلمنا مع {PERSON} عن ال{N}.",
    "هو دايما بيتأخر على ال{N}.",
    "لو {PERSON} وافق، هنبدأ ال{N} {TIME}.",
    "أنا نسيت {V} ال{N} خالص.",
    "الجو في {PLACE} كان {ADJ} امبارح.",
    "يا ريت نخلص ال{N} بدري.",
    "هي قالتلي إن {PLACE} {ADJ} جدا.",
    "محتاج {V} حاجات كتير {TIME}.",
    "ال{N} بتاع {PERSON} أحسن من بتاعي.",
    "أنا مش فاضي {TIME}، عندي {N}.",
    "كلم {PERSON} وقوله إن ال{N} جاهز.",
    "إحنا قاعدين في {PLACE} من الصبح.",
    "الموضوع مش {ADJ} زي ما إنت فاكر.",
    "هو بعتلي ال{N} {TIME}.",
    "عايز {V} قبل ما {PERSON} ييجي.",
    "ليه ال{N} ده {ADJ} كده؟",
    "أول ما توصل {PLACE} كلمني.",
    "فيه {N} جديد في {PLACE}.",
    "أنا شايف إن ال{N} محتاج شغل كتير.",
    "مش هقدر {V} ال{N} لوحدي.",
    "يعني إيه {N} ده أصلا؟",
    "{TIME} هنروح {PLACE} مع {PERSON}.",
    "خلي بالك، ال{N} {TIME}.",
    "كان عندنا {N} طويل وكان {ADJ}.",
    "اتفقنا {V} كل حاجة {TIME}.",
    "ساعات {PERSON} بيبقى {ADJ} شوية.",
)

# --- German and French with English (used monolingually in the backward suite) ------------------------

_DE_WORDS = {
    "N": ("Bericht", "Termin", "Vertrag", "Plan", "Kurs", "Urlaub", "Computer", "Brief", "Zug", "Garten"),
    "V": ("prüfen", "vorbereiten", "schicken", "absagen", "drucken", "lesen", "kaufen", "reparieren"),
    "ADJ": ("wichtig", "schwierig", "einfach", "teuer", "langweilig", "schön", "neu", "alt", "spannend"),
    "TIME": ("morgen", "heute Abend", "nächste Woche", "am Wochenende", "gestern", "am Montag"),
    "PERSON": ("mein Chef", "meine Schwester", "der Lehrer", "unser Nachbar", "die Ärztin", "mein Kollege"),
}
_DE_TEMPLATES = (
    "Ich muss den {N} {TIME} {V}.",
    "{PERSON} sagt, der {N} ist sehr {ADJ}.",
    "Hast du den {N} schon gesehen?",
    "Wir wollen {TIME} zusammen einen {N} {V}.",
    "Der {N} war gar nicht so {ADJ}.",
    "Kannst du bitte den {N} für {PERSON} {V}?",
    "Warum hat {PERSON} den {N} nicht gelesen?",
    "{TIME} habe ich keine Zeit für den {N}.",
    "Das Wetter war {TIME} wirklich {ADJ}.",
    "Ich glaube, {PERSON} findet das {ADJ}.",
    "Unser {N} ist leider noch nicht fertig.",
    "Vergiss nicht, den {N} zu {V}.",
    "Es ist {ADJ}, jeden Tag den {N} zu {V}.",
    "Nach der Arbeit gehe ich mit {PERSON} spazieren.",
    "Der neue {N} kommt {TIME}.",
    "Niemand wusste, wo der {N} war.",
)
_FR_WORDS = {
    "N": ("rapport", "rendez-vous", "contrat", "projet", "cours", "voyage", "dossier", "train", "jardin", "livre"),
    "V": ("vérifier", "préparer", "envoyer", "annuler", "imprimer", "lire", "acheter", "réparer"),
    "ADJ": ("important", "difficile", "simple", "cher", "ennuyeux", "beau", "nouveau", "intéressant"),
    "TIME": ("demain", "ce soir", "la semaine prochaine", "ce week-end", "hier", "lundi"),
    "PERSON": ("mon patron", "ma sœur", "le professeur", "notre voisin", "le médecin", "mon collègue"),
}
_FR_TEMPLATES = (
    "Je dois {V} le {N} {TIME}.",
    "{PERSON} dit que le {N} est très {ADJ}.",
    "Tu as déjà vu le {N} ?",
    "Nous voulons {V} un {N} {TIME}.",
    "Le {N} n'était pas si {ADJ}.",
    "Peux-tu {V} le {N} pour {PERSON} ?",
    "Pourquoi {PERSON} n'a pas lu le {N} ?",
    "{TIME}, je n'ai pas le temps pour le {N}.",
    "Il faisait vraiment beau {TIME}.",
    "Je crois que {PERSON} trouve ça {ADJ}.",
    "Notre {N} n'est pas encore prêt.",
    "N'oublie pas de {V} le {N}.",
    "C'est {ADJ} de {V} le {N} tous les jours.",
    "Après le travail, je me promène avec {PERSON}.",
    "Le nouveau {N} arrive {TIME}.",
    "Personne ne savait où était le {N}.",
)


def _embedded_for(slots: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """English fills for a matrix language's slots (matrix slot -> English slot)."""
    return {slot: EMBEDDED_ENGLISH[english_slot] for slot, english_slot in slots.items()}


_SAME = {slot: slot for slot in ("N", "V", "ADJ", "TIME", "PLACE", "PERSON")}

BUILTIN_PAIRS: dict[str, CodeSwitchSpec] = {
    "zh-en": CodeSwitchSpec(LanguagePair("zh", "en"), _ZH_TEMPLATES, _ZH_WORDS, _embedded_for(_SAME)),
    "es-en": CodeSwitchSpec(
        LanguagePair("es", "en"), _ES_TEMPLATES, _ES_WORDS,
        _embedded_for({"Nm": "N", "Nf": "N", "V": "V", "ADJ": "ADJ", "TIME": "TIME", "PERSON": "PERSON"}),
    ),
    "ar-en": CodeSwitchSpec(LanguagePair("ar", "en"), _AR_TEMPLATES, _AR_WORDS, _embedded_for(_SAME)),
    "de-en": CodeSwitchSpec(
        LanguagePair("de", "en"), _DE_TEMPLATES, _DE_WORDS,
        _embedded_for({k: k for k in ("N", "V", "ADJ", "TIME", "PERSON")}),
    ),
    "fr-en": CodeSwitchSpec(
        LanguagePair("fr", "en"), _FR_TEMPLATES, _FR_WORDS,
        _embedded_for({k: k for k in ("N", "V", "ADJ", "TIME", "PERSON")}),
    ),
}


def builtin_spec(name: str) -> CodeSwitchSpec:
    """A built-in pair by name ("zh-en", "es-en", "ar-en", "de-en", "fr-en") or "en" for English read speech."""
    if name == "en":
        return english_spec()
    if name not in BUILTIN_PAIRS:
        raise ValueError(
            f"no built-in language pair {name!r}; choose one of {', '.join(['en', *BUILTIN_PAIRS])} "
            "or pass your own CodeSwitchSpec"
        )
    return BUILTIN_PAIRS[name]
