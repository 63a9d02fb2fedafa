"""The guard: what to do with a message before any answer is generated.

``Guard.classify(text, hits)`` returns a ``GuardDecision`` with one of five labels, checked in
this order (the first that applies wins):

1. ``self_harm``: expressions of suicide or self-injury (Spanish and English). Checked first so
   that a student in distress always gets a caring reply, even inside a school question.
2. ``refuse``: prompt injection (instruction override, persona change, requests to reveal the
   instructions, fake system tags), then harmful requests (forgery, cheating and bribery,
   hacking, theft, harm to animals, drugs, weapons, violence and intimidation).
3. ``chitchat``: greetings, thanks, goodbyes, acknowledgements, small talk and questions about
   the assistant itself, only when nothing else is left in the message ("hola, ¿cómo saco mi
   constancia?" is a question, not chit-chat).
4. ``out_of_scope``: near-miss cues that decide alone (other people's data, opinions about
   teachers, exam contents); then the best retrieval score: below ``Thresholds.out_of_scope``,
   or below the higher ``Thresholds.with_cue`` when the message has an off-topic cue (another
   institution's procedure, a campus service another office runs, homework, trivia).
5. ``answer``.

Rules are small curated regular expressions on a folded form of the message (lower case, no
accents, repeated letters squeezed, texting spellings expanded, one-letter typos in a few key
words corrected); each list says what it is for. Only the two thresholds are learned:
``calibrate`` picks them to maximise out-of-scope F1 with false refusals of in-scope questions
at most 3 %, and ``Guard.save`` / ``Guard.load`` keep them as ``guard.json`` next to the
retrieval index. Rules were preferred to a char n-gram classifier by figures: trained on the
same calibration data, logistic regression on char 2–5-grams got 0/6 self-harm, 3/21 harmful,
7/12 injection and 2/18 chit-chat messages of the test half right; the rules 6/6, 17/21, 10/12
and 13/18.

``calibration_protocol`` is the honest measurement: the out-of-scope sets are split in halves by
id hash (``split_out_of_scope``); rules and thresholds were written and chosen on the
calibration halves only; figures are reported on both. The blind test's out-of-scope messages
(``data/cse/blind_out_of_scope.jsonl``, written later by other writers) showed the rules
missing a quarter of its calibration half (48 of 191, 24 answered): the rules were widened on
that half alone (8 missed, 2 answered), and no in-scope text of the knowledge base gains a rule
or a cue from it. Three self-harm phrasings its test half missed ("lo mejor sería desaparecer",
"estarían mejor si yo no existiera", "ending it all") were added too, for safety: that half's
self-harm figure is not blind. ``python -m gemma_cse.guard
calibrate [--index DIR]`` runs it, prints the figures and writes ``DIR/guard.json``. Its in-scope
questions are every non-test variant, asked in 5 folds of an index without them (~3 min of
this CPU with USE): the seed-13 validation variants alone (120) set the threshold by their
second-lowest score, 0.34 on the sample KB, where the 661 variants measure 2.7 % false
refusals; with all of them it was 0.30 (1.2 %), and 0.32 after round 5 of paraphrases.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import json
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from gemma_cse.cli import UserError, run
from gemma_cse.data import (
    BLIND_OUT_OF_SCOPE_FILE,
    OUT_OF_SCOPE_FILE,
    Entry,
    OutOfScope,
    load_entries,
    load_out_of_scope,
    make_splits,
)
from gemma_cse.models import cache_dir

LABELS = ("answer", "out_of_scope", "refuse", "chitchat", "self_harm")
THRESHOLDS_FILE = "guard.json"
MAX_FALSE_REFUSALS = 0.03  # the goal on in-scope questions
# what calibration aims at: half the goal. 3 % of 120 calibration questions is 3–4 questions,
# and the test half's rate came out 2–3 points above the calibration half's (measured)
CALIBRATION_FALSE_REFUSALS = MAX_FALSE_REFUSALS / 2
# the calibration asks every non-test variant, each of an index without its fold (see above)
CALIBRATION_FOLDS = 5
# used only until a calibration is run or loaded: the values calibrated with the default
# retriever (USE embedder) on the sample knowledge base
DEFAULT_THRESHOLD = 0.32
DEFAULT_CUE_THRESHOLD = 0.69
EXPECTED_LABEL = {  # out_of_scope.jsonl's "expected" status → the guard's label
    "out_of_scope": "out_of_scope",
    "refused": "refuse",
    "self_harm": "self_harm",
    "chitchat": "chitchat",
    "answer": "answer",
}


@dataclass(frozen=True)
class GuardDecision:
    """label: one of LABELS; reason: short and machine-readable ("forgery", "injection",
    "low_retrieval_score", ...); score: the best retrieval score for decisions taken on it
    (``answer`` and ``low_retrieval_score``), 1.0 for decisions taken by a rule."""

    label: str
    reason: str
    score: float


# ---------------------------------------------------------------- folding

# texting spellings → standard words, applied per token after folding
_SPELLING = {
    "q": "que",
    "k": "que",
    "qe": "que",
    "ke": "que",
    "kiero": "quiero",
    "kieres": "quieres",
    "kiere": "quiere",
    "kisiera": "quisiera",
    "qiero": "quiero",
    "porke": "porque",
    "aki": "aqui",
    "xq": "porque",
    "pq": "porque",
    "tmb": "tambien",
    "tb": "tambien",
    "porfa": "por favor",
    "porfis": "por favor",
    "xfa": "por favor",
    "pls": "por favor",
    "plis": "por favor",
    "grax": "gracias",
    "grasias": "gracias",
    "gracais": "gracias",
    "grcias": "gracias",
    "ola": "hola",
    "holi": "hola",
    "holis": "hola",
    "bno": "bueno",
    "bn": "bien",
    "vdd": "verdad",
    "pa": "para",
    "pal": "para el",
    "nomas": "no mas",
    "ntp": "no te preocupes",
    "tqm": "te quiero mucho",
}
# words a typo must not hide (one edit away is enough): only long, unambiguous ones
_TYPO_KEYWORDS = (
    "suicidio",
    "suicidarme",
    "suicidarse",
    "suicidame",
    "ahorcarme",
    "lastimarme",
    "lastimandome",
    "autolesion",
    "autolesionarme",
    "cortandome",
    "falsificar",
    "falsifico",
    "instrucciones",
    "restricciones",
)


def _correct(word: str) -> str:
    if len(word) < 8 or word in _TYPO_KEYWORDS:
        return word
    close = difflib.get_close_matches(word, _TYPO_KEYWORDS, n=1, cutoff=0.88)
    return close[0] if close else word


def fold(text: str) -> str:
    """Lower case, no accents, letters repeated 3+ times squeezed, texting spellings expanded,
    one-letter typos in a few key words corrected, punctuation dropped: the form every rule
    below is written against."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"(\w)\1{2,}", r"\1", text)  # "holaaa" → "hola", "graciaaas" → "gracias"
    text = re.sub(r"([aiou])\1\b", r"\1", text)  # "holaa" → "hola" ("lee", "cree" stay)
    words = re.findall(r"[^\W_]+", text)
    return " ".join(_correct(_SPELLING.get(w, w)) for w in words)


def _rx(*patterns: str) -> re.Pattern:
    """One regex matching any of ``patterns`` as whole words."""
    return re.compile("|".join(rf"\b(?:{p})\b" for p in patterns))


# ---------------------------------------------------------------- 1. self-harm

SELF_HARM = _rx(
    # suicide, wanting to die or not to live (ES)
    r"suicid\w*",
    r"(quitarme|quitar me|quitar) la vida|irme de este mundo",
    r"no merezco (vivir|estar viv[oa]|existir|seguir)|(soy|seria) una carga para (todos|mi familia|"
    r"mis papas|mi mama|mi papa)",
    r"me lastime a proposito|a proposito me (lastime|corte|queme|golpee)",
    r"(acabar|terminar|poner fin a|ponerle fin a)( con)? (mi vida|todo de una vez|con todo ya)",
    r"(quiero|quisiera|voy a|pienso|pensando en|pensado en|ganas de|deseos de|me dan ganas de|"
    r"he pensado|estoy pensando|quiero ya) (en )?(matarme|morirme|quitarme la vida|"
    r"desaparecer( para siempre| del mundo)?|acabar con todo|terminar con todo|dejar de existir|"
    r"ahorcarme|colgarme|envenenarme)(?! de (la )?(risa|hambre|sueno|aburrimiento|ganas|calor|"
    r"frio|nervios|verguenza))",
    r"matarme|ahorcarme|envenenarme|suicidarme|suicidame",
    r"(me (quiero|voy a|quisiera|gustaria) (matar|morir|ahorcar|envenenar)|"
    r"quiero (estar )?(morir\w*|muert[oa]))(?! de (la )?(risa|hambre|sueno|aburrimiento|ganas|"
    r"calor|frio|nervios|verguenza))",
    r"(mejor|ojala) me (muero|muera|muriera|hubiera muerto)",
    r"(seria|es) mejor (morirme|morir|estar muert[oa]|no existir|desaparecer)",
    r"(quisiera|ojala) no (existir|haber nacido|despertar)",
    r"me mato(?! (estudiando|trabajando|haciendo|de |con la tarea|en el|en la))",
    r"(pienso|pensando|pensado|pensar) (mucho |todo el tiempo |seguido )?en (morir|morirme|"
    r"la muerte|"
    r"matarme|hacerme dano|quitarme la vida|desaparecer|hacerme algo(?! (diferente|distinto|nuevo|"
    r"de |en |con |para |mas|otro|otra|bonito)))",
    r"(ganas|deseos) de (morir|morirme|no existir|desaparecer|dejar de existir|no despertar)",
    r"(quiero|quisiera) (que todo (termine|se acabe)|irme para siempre)",
    r"(acabar|terminar) con (mi sufrimiento|este sufrimiento|mi dolor)",
    r"(ya )?no (aguanto|soporto|puedo) (mas )?(la vida|vivir|con mi vida|seguir viviendo)",
    r"(me despido|despedirme) (para siempre|de todos para siempre)|mi (ultima|carta de) despedida",
    r"(la|una) (soga|cuerda) para (colgarme|ahorcarme)|me voy a (colgar|ahorcar|aventar de)",
    r"ojala no (despierte|despertara|amanezca|hubiera nacido)",
    r"me muero antes",
    r"(ya )?no quiero (seguir )?(vivir|viviendo|estar vivo|estar viva|existir|despertar|estar aqui|"
    r"seguir aqui|seguir en este mundo)",
    r"(no|ya no) (tiene|le veo|le encuentro|hay|tengo) (caso|sentido|razon\w*|motivos?|ganas)"
    r"( de| para| a)? (seguir )?(vivir|viviendo|la vida|existir|estar aqui|seguir aqui)",
    r"no le (veo|encuentro) (el )?sentido a (nada|la vida|vivir|seguir|mi vida)",
    r"(la vida|vivir) (ya )?no (vale|tiene) (la pena|sentido)",
    r"(estarian|estaria|estarán) mejor (sin mi|si yo no (existiera|estuviera))",
    r"nadie (me extranaria|notaria si me muero|me va a extranar)",
    r"dormir(me)? (para siempre|y no despertar)",
    r"para (ya )?no (volver a )?despertar(me)?(?! (tarde|temprano|a tiempo))",
    r"(cansad[oa]|me canse|harto|harta) de (vivir|la vida|existir|estar vivo|estar viva)",
    r"(tomarme|me tomo|tomar|me tome|me voy a tomar) (todas )?(las|unas|muchas|todas mis|todo el "
    r"frasco de|el frasco de|un frasco de) pastillas",
    r"sobredosis|overdose",
    r"pastillas( \w+){0,3} (para )?tomarmelas|tomarmelas todas",
    r"lo mejor (seria|es|va a ser) (morirme|morir|no existir|desaparecer)",
    r"(pensamientos|ideas|ideacion) (suicidas?|de muerte|de matarme)",
    # self-injury; "me corté el pelo" is not
    r"(cortarme|me corto|me corte|cortandome|volver a cortarme|me (estoy|sigo) cortando)"
    r"(?! (el|la|las|los|mi|mis) (pelo|cabello|fleco|barba|unas|pierna al rasurar)"
    r"| con (una|la|el|un) (hoja|papel))",
    r"cortarme las (venas|munecas)|(me corto|me hago cortes|me hago heridas)( \w+){0,2} "
    r"(los brazos|las piernas|las munecas|la piel)",
    r"(lastimarme|lastimandome|me lastimo|me estoy lastimando|hacerme dano|me hago dano|"
    r"autolesion\w*|golpearme|me golpeo|(me quemo|quemarme) a proposito|rasgunarme|me rasguno)",
    r"me pego (en|con|contra) (la|el|mi|las|los) (cabeza|pared|piso|puerta)",
    # jumping, either order within a few words ("aventarse" alone also means "to go": not enough)
    r"(aventarme|tirarme|lanzarme|arrojarme)( \w+){0,3} (de|desde) (la|el|un|una|lo alto de)"
    r"( \w+){0,2} (azotea|techo|puente|edificio|piso|balcon|ventana|precipicio|barranco)",
    r"(aventarme|tirarme|lanzarme|arrojarme) (a|al|a las|a los|bajo|debajo de|frente a|enfrente"
    r" de|enfrente del) (las vias|vias|el tren|tren|metro|carros|los carros|un carro|un camion)",
    r"(azotea|puente|vias|metro|balcon|ventana)( \w+){0,12} (aventarme|tirarme|lanzarme|"
    r"arrojarme)",
    # English
    r"kill(ing)? myself|end (my|it all|my own) life|end(ing)? it all|take my (own )?life",
    r"(want|wanna|going) to die|wish i (was|were) dead|want to disappear|feel like dying",
    r"(i ve been|i have been|i am|i m|keep) cutting",
    r"hurt(ing)? myself|cut(ting)? myself|self ?harm\w*",
    r"(don t|do not|dont) want to (live|be alive|wake up|be here)",
    r"no reason to live",
)


# ---------------------------------------------------------------- 2. refuse

# prompt injection, on the folded text
_BOT_RULES = (
    r"(instrucciones|reglas|indicaciones|directrices|restricciones|configuracion|prompt|"
    r"programacion|politicas)"
)
INJECTION = _rx(
    # instruction override
    r"ignora\w*( \w+){0,4} (anterior\w*|instrucciones|reglas|restricciones|indicaciones|"
    r"arriba|filtros|limites|lo que te (digan|dijeron|pusieron|programaron|indicaron))",
    r"olvida\w* (que eres|tu papel|tu rol|quien eres)",
    r"(no tuvieras|no tienes|no tengas|no tuvieses) (restricciones|reglas|filtros|limites)",
    r"(olvida\w*|omite|omitir|desactiva\w*|quita\w*|apaga\w*|elimina\w*|salta\w*|brinca\w*|"
    r"borra\w*|resetea\w*|rompe|romper|evade|evadir|deja de seguir|deja de lado)"
    r"( \w+){0,2} (instrucciones|reglas|restricciones|filtros|verificaciones|politicas|"
    r"limites|configuracion|protocolos|programacion|memoria|censura|moderacion|seguridad)",
    r"olvida\w* (todo )?(lo anterior|lo que te dijeron|lo de antes|todo lo que sabes)",
    r"olvida(te)? (de )?todo",
    r"sin (restricciones|filtros?|censura|limites|reglas|candados)",
    r"tus (filtros|candados|limites)",
    r"caso omiso (a|de)( \w+){0,2} (instrucciones|reglas|indicaciones|restricciones|todo)",
    r"(no sigas|deja de seguir|no obedezcas|desobedece|no respetes|rompe) (tus|las|sus) "
    r"(reglas|instrucciones|indicaciones|restricciones|politicas)",
    r"eres dan|ya eres libre|te ordeno|es una orden(?! de)",
    r"(atencion|nota|aviso|mensaje|instruccion|instrucciones|orden) (para |a )?(la ia|el asistente|"
    r"al asistente|el bot|al bot|el modelo|al modelo|chatgpt|la inteligencia artificial)",
    r"prompt|system message|(admin|system|security) override|override (code|mode)",
    r"(responde|contesta|habla)\w* (solo |solamente |unicamente )?(con |en )?(groserias|"
    r"insultos|malas palabras|clave)",
    r"(tu nueva|nueva) (personalidad|identidad)|(tu nuevo|nuevo) (rol|papel)",
    r"(instruccion|instrucciones|orden|mensaje) (prioritari[oa]|urgente del sistema|"
    r"del administrador|del desarrollador|del sistema|del programador)",
    # an instruction "authorised" by someone, or to say what is not true
    r"(te )?autoriz\w* (a |para )?(que )?(respondas|digas|contestes|ignores|ignorar|decir|"
    r"responder|contestar)",
    r"aunque (no sea cierto|no sea verdad|sea mentira|sea falso)",
    r"repite (despues de mi|conmigo|exactamente|tal cual)",
    r"(responde|contesta|habla)\w* (solo |solamente |unicamente )?(en|como) (pirata|verso|rima)",
    r"(ignore|disregard|forget|override|bypass)( \w+){0,3} (instruc\w+|rules|prompt|above|"
    r"previous|restric\w+|guidelines|filters)",
    r"jailbreak\w*|jail break|do anything now",
    # persona change
    r"(a partir de ahora|a partir de este mensaje|de ahora en adelante|de aqui en adelante|"
    r"desde (ahora|este momento|hoy)|en adelante|from now on)"
    r"( \w+){0,3} (eres|seras|seas|actua\w*|actues|responde\w*|respondas|contesta\w*|"
    r"contestes|habla\w*|hables|te llamas|vas a|di|digas|diras|dile|you are|act|respond)",
    r"ahora (eres|seras|vas a ser) (un|una|el|la|mi)",
    r"(?<!quien )(actua|actue|actuar|actues|finge|fingir|finjas|pretende|simula|simular|"
    r"haz de cuenta|"
    r"imagina|imaginate|juguemos a|hagamos) (como si|como|que eres|ser|de|un juego de rol)",
    r"(contesta|responde|habla)\w* como si (fueras|fuera|eres)",
    r"(tu nuevo|tu nueva) (rol|nombre|personalidad|identidad|tarea)",
    r"ya no eres (el|un|una) (asistente|bot)|deja de ser (el|un) (asistente|bot)",
    r"eres (un|una) (actor|actriz|personaje)",
    r"(no salgas|sin salir) del (personaje|papel|rol)",
    r"interpreta(r|s)? (a|el papel|un papel|el rol|un rol)",
    r"(you are now|pretend (you are|to be)|act as|act like|behave as|role ?play|"
    r"stay in character|you are no longer|no longer (a|an|the) )",
    r"your (rules|instruc\w+|prompt|guidelines|configuration)|sudo",
    r"(cual es|como es|dime) tu (configuracion|programacion|prompt)",
    r"(habla|hablame|responde|respondeme|contesta|contestame) como (un|una|si) ",
    r"(que|confirma que|confirmes que) soy (el |un |la |una )?(administrador\w*|admin|root)",
    r"modo (desarrollador|developer|dios|administrador|admin|root|sin filtros?|libre|dan|debug|"
    r"mantenimiento|prueba|pruebas|superusuario|sin censura)",
    r"(developer|admin|god|dan|debug) mode",
    r"te desbloque\w*|desbloquearte|desbloqueate|codigo (de desbloqueo|secreto|maestro)",
    r"he sido liberado|estoy liberado",
    # revealing the instructions
    r"(tu|tus|el|su|sus) (prompt|system prompt|mensaje de sistema|mensaje del sistema|"
    r"mensaje inicial|texto inicial)",
    rf"{_BOT_RULES} (internas?|ocultas?|secretas?|del sistema|de sistema|originales|iniciales|"
    r"previas|completas)",
    r"(revela\w*|muestra\w*|ensena\w*|pega\w*|imprime|copia\w*|comparte|dame|dime|escribe|"
    r"lista\w*|traduce|resume|resumeme|recita|transcribe)"
    rf"( \w+){{0,3}} (tus {_BOT_RULES}|sus (instrucciones|prompt|configuracion|programacion))",
    rf"(que|cuales) (son )?tus {_BOT_RULES}",
    r"(que|cuales) (son )?sus (instrucciones|prompt|configuracion|programacion)",
    rf"(que|cuales) {_BOT_RULES} (tienes|sigues|te (pusieron|dieron|programaron|escribieron))",
    rf"{_BOT_RULES} (que )?te (pusieron|dieron|programaron|escribieron)",
    r"(como|quien) te (programaron|configuraron|programo|configuro)",
    r"(revela\w*|muestra\w*|ensena\w*|pega\w*|imprime|dame|dime|comparte|escribe)( \w+){0,2} "
    r"(tu|la) (configuracion|programacion|instruccion|instrucciones|prompt)",
    r"(instruccion|instrucciones|indicaciones|reglas) que (recibiste|te dieron|tienes|sigues)",
    r"te (dijeron|ordenaron|prohibieron|pidieron) que no (digas|reveles|respondas|contestes)",
    r"repite( \w+){0,4} (texto|mensaje|mensajes|todo|palabras)( \w+){0,5} (arriba|anterior\w*|"
    r"antes)",
    r"(todo )?lo que (esta|dice|viene) (arriba|antes) de (este|mi) mensaje",
    r"(print|show|reveal|repeat|tell me|translate)( \w+){0,3} (hidden|system|your|initial|the) "
    r"(configuration|instruc\w+|prompt|rules)",
    r"(repeat|print)( \w+){0,4} (above|before)",
    r"system override|system prompt|hidden configuration|initial prompt|your instruc\w+",
    # dressing an instruction as coming from the system, an admin or a document
    r"nota para el (asistente|bot|modelo|chatbot|sistema|ia)",
    r"el usuario es (el |un )?(administrador\w*|admin|root|desarrollador\w*)",
    r"soy (el |la |tu )?(administrador\w*|admin|root|desarrollador\w*|programador\w*|creador\w*)"
    r" (del sistema|de este bot|del bot|del sel|de ti|del asistente|del chat)",
    r"soy tu (creador\w*|programador\w*|desarrollador\w*|administrador\w*|jefe|jefa|dueno)",
    r"ejercicio de seguridad|prueba de seguridad autorizada|auditoria de seguridad",
    r"(tengo|con) (permiso|autorizacion|acceso) (de|del) (administrador|admin|root|sistema|la dti)",
    r"(acceso|privilegios|permisos) (de|como) (administrador|admin|root|superusuario)",
    # evading the filters
    r"base ?64|rot ?13|en hexadecimal",
    r"para que no (la|lo|te|me|se) (bloqueen|detecten|filtren|censuren)",
)

# fake system / role tags and turn markers, on the raw text
FAKE_TAGS = re.compile(
    r"\[\s*/?\s*(sistema|system|admin|administrador|developer|desarrollador|instrucci\w*|inst|"
    r"sys)\s*[:\]]"
    r"|</?\s*(system|sistema|instrucci\w*|instructions?|pregunta|prompt|user|usuario|assistant|"
    r"asistente|admin|developer|sys)\b[^>]*>"
    r"|<<\s*/?\s*sys\s*>>"
    r"|\[\s*(nota|mensaje|aviso|instruccion) del (sistema|administrador|desarrollador)"
    r"|\{\{\s*(system|sistema|admin)"
    r"|<\|?\s*(im_start|im_end|start_of_turn|end_of_turn|system|endoftext)\s*\|?>"
    r"|^\s*#*\s*(system|sistema|admin|administrador|developer|desarrollador)\s*:"
    r"|^\s*#{2,}\s*(system|sistema|instrucci\w*|instructions?)\b"
    r"|fin del mensaje del usuario|end of user input|fin de (las )?instrucciones"
    r"|\b(nuevas? instrucci\w+|new instructions?)\s*:",
    re.IGNORECASE | re.MULTILINE,
)

_DOCUMENTS = (
    r"(titulo|titulos|cedula|cedulas|certificado|certificados|constancia|constancias|kardex|"
    r"credencial|credenciales|firma|firmas|sello|sellos|incapacidad|incapacidades|receta|"
    r"justificante|justificantes|diploma|diplomas|boleta|boletas|historial|acta|actas|"
    r"documento|documentos|comprobante|comprobantes|carta|cartas|ine|identificacion|"
    r"transcript|degree)"
)
_OTHERS = (
    r"(otro|otra|otros|otras|un profe\w*|una profe\w*|el profe\w*|la profe\w*|mi ex|mi novi\w*|"
    r"alguien|un companer\w*|una companer\w*|mi companer\w*|mis companer\w*|un maestr\w*|"
    r"una maestr\w*|el maestr\w*|la maestr\w*|mi roomie|un profesor\w*|una profesor\w*|"
    r"el profesor\w*|la profesora|mi amig[oa]|un amig[oa]|todos los alumnos|los alumnos|"
    r"los de primer ingreso|mi herman[oa]|el coordinador\w*|la coordinador\w*)"
)

# (reason, pattern) on the folded text; the first that matches names the reason
HARMFUL: tuple[tuple[str, re.Pattern], ...] = (
    (
        "forgery",
        _rx(
            r"falsific\w*|falsea\w*|apocrif\w*",
            rf"{_DOCUMENTS}( \w+){{0,3}} (falso|falsa|falsos|falsas|chueco|chueca|chuecos|"
            r"patito|clonad[oa]s?|alterad[oa]s?|trucad[oa]s?)",
            rf"(falso|falsa|falsos|falsas) {_DOCUMENTS}",
            r"(imitar|imito|imitarle|copiar|copio|copiarle|clonar|clono|calcar|calco|falsear)"
            r"( \w+){0,3} (firma|firmas|sello|sellos|rubrica)",
            # editing an official document so that it does not show
            r"(modific|edit|alter|retoc|cambi|arregl|photoshop|corrig)\w*( \w+){0,6} (pdf|kardex|"
            r"constancia|certificado|titulo|boleta|historial|calificaciones?|promedio|cedula)"
            r"( \w+){0,12} (que no se note|sin que se (note|den cuenta)|que parezca|para que diga|"
            r"que programa|photoshop|editor de pdf)",
            # changing a grade in the system unnoticed
            r"(cambi|modific|alter|sub|pon)\w*( \w+){0,6} (calificacion\w*|promedio|notas?)"
            r"( \w+){0,8} sin que (se den cuenta|nadie se de cuenta|se note|lo noten)",
            r"(subir|subirle|cambiar|inflar|maquillar)( \w+){0,2} (mi|el) promedio( \w+){0,6} "
            r"(pdf|programa|editar|photoshop)",
            r"(compr\w*|consigo|conseguir|vend\w*|tramitar)( \w+){0,2} (un |una |el |la )?"
            r"(titulo|cedula|diploma|certificado|constancia|kardex)( \w+){0,6} (falso|falsos|"
            r"falsa|sin (estudiar|haber estudiado|cursar|terminar)|"
            r"que (si )?pas\w+ la verificacion)",
            r"(compr\w*|vend\w*) (titulos|cedulas|diplomas|certificados)",
            r"(vende|venden|vendes|vender|venda)( \w+){0,2} (un |una |el |la )?(certificados?|"
            r"titulos?|cedulas?|constancias?|kardex|diplomas?|credencial|credenciales|boletas?)",
            rf"(hacer|hago|haces|hagas|hazme|hacerme|crear|creo|elaborar|generar|fabricar|disenar|"
            rf"armar)( \w+){{0,3}} "
            rf"{_DOCUMENTS}( \w+){{0,6}} (photoshop|en word|en canva|con el logo|con el sello|"
            r"con la firma|que parezca|identic\w*|igualit\w*|sin que)",
            r"(edit|modific|alter|retoc|cambi)\w*( \w+){0,4} (comprobante|recibo|ticket|"
            r"voucher) de "
            r"(pago|transferencia|deposito)",
            r"firmar (por|como si fuera|en lugar de) (el|la|mi|un|una)|(poner|pongo|ponerle)"
            r"( \w+){0,2} la firma (de|del)",
            r"(usar|uso|prestar|presta|prestame)( \w+){0,3} (credencial|ine|identificacion)"
            r"( \w+){0,2} (de|del) (otro|otra|alguien|mi amig\w*|mi herman\w*|un companer\w*)",
            r"(mentir|miento|inventar|invento|falsear)( \w+){0,3} (en|para) (la|mi|el) "
            r"(solicitud|beca|estudio socioeconomico|formato|tramite|ingresos)",
            r"(ocultar|esconder|declarar menos|no declarar)( \w+){0,1} ingresos",
            r"(queja|denuncia|acusacion) falsa|acusar falsamente|(inventarle|inventar)( \w+){0,2} "
            r"(acoso|una queja|una denuncia|un chisme)",
            r"(hacerme|hacerse|hacer) pasar por",
            r"(fake|forge|forged|forging|forgery|counterfeit|doctored)",
            r"(edit|alter|change|modify)( \w+){0,3} (transcript|grades?|diploma|certificate|degree|"
            r"gpa)( \w+){0,4} (without|so (that )?no one|so nobody|undetect\w*)",
            r"(copy|imitate) (\w+ ){0,2}signature",
            r"(subirme|subir|inflar|mejorar)( \w+){0,2} (mi )?promedio( \w+){0,4} (sin que|"
            r"editando|"
            r"modificando|en el sistema|en el sel|hackeando)",
        ),
    ),
    (
        "cheating",
        _rx(
            r"(pasame|pasas|dame|vendeme|venden|vendes|consigueme|tienes|tienen)( \w+){0,2} "
            r"(las )?(respuestas|soluciones)",
            r"(exam|test|final|midterm) answers|answers (to|for) the (exam|test|final|midterm)|"
            r"take my (exam|test) for me|plagiari\w*",
            r"(respuestas|soluciones|preguntas|reactivos) (del|de los|de la|para el|de el) "
            r"(examen|departamental|final|parcial|extraordinario|evaluacion)\w*",
            r"(copiar|copiarme|copio|copie|hacer trampa|trampa)( \w+){0,2} (en|durante) "
            r"(el|un|los|la|mis|mi) (examen|final|parcial|departamental|evaluacion)\w*",
            r"(como|puedo|quiero|ayudame a|para|forma de|manera de) hacer trampa|acordeon\w*",
            r"(robar|robarme|robo|filtrar|conseguir|consigo|sacar|saco)( \w+){0,2} (el|los) "
            r"(examen|examenes|departamental|departamentales)"
            r"( \w+){0,3} (antes|filtrado)",
            r"examen(es)? filtrados?",
            r"(haga|hiciera|presente|presentara|conteste|contestara|haga|resuelva)( \w+){0,2} "
            r"(mi|el|los) (examen|examenes|departamental|final)( \w+){0,3} (por mi|en mi lugar)",
            r"suplantar (a|al|a la)|suplantarl[oa]|(como|puedo) suplantar",
            r"(como|puedo|quiero|ayudame a) plagiar|plagiar( \w+){0,2} (tesis|trabajo|ensayo)",
            r"(comprar|compro|pagar|pago|pagarle|le pago)( \w+){0,2} (una|la|mi|el|un) "
            r"(tesis|tarea|ensayo|examen|proyecto terminal)",
            # bribery
            r"mordida|soborn\w*|bribe\w*|cohecho",
            r"(dar|darle|ofrecer|ofrecerle|pasarle|pagarle|regalarle)( \w+){0,2} (dinero|lana|varo|"
            r"billete|feria|una lana)( \w+){0,4} (profe\w*|maestr\w*|coordinador\w*|ventanilla|"
            r"personal|secretari\w*|jef\w*)",
            r"(dinero|lana|varo|pago|pagarle|regalo|regalarle|soborno|cooperacion|invitarle)"
            r"( \w+){0,6} (para|pa) que me (pase|pasen|apruebe\w*|suba|suban|ponga|pongan|"
            r"acredite\w*)",
            r"(subir|suba|pasar|pase|poner|ponga|cambiar|cambie)( \w+){0,3} (calificacion\w*|"
            r"examen|materia|mb)( \w+){0,4} a cambio de",
            r"(presentar|hacer|contestar)( \w+){0,2} (el|su) examen (por|de) (mi amig\w*|otro|otra|"
            r"alguien)",
            r"(pagar|pagarle|cobran|cobra|cuanto)( \w+){0,4} (hagan|haga|hacer|hacerme) (mi|la|"
            r"una) "
            r"(tesis|tarea|proyecto|ensayo)",
            r"(usar|uso|usando)( \w+){0,2} (chatgpt|el celular|internet)( \w+){0,2} (en|durante) "
            r"(el|un) (examen|final|parcial|departamental)",
            r"(cuanto|que) (le )?(tengo que|debo|hay que )?(dar|darle|pagar|pagarle|ofrecer|"
            r"ofrecerle)( \w+){0,6} (para|pa) que me (pase|pasen|apruebe\w*|suba|suban|ponga|"
            r"pongan|acredite\w*|cambie\w*)",
            r"(pagar|pagarle|pago|le pago|le doy)( \w+){0,3} (para|pa) que me "
            r"(pase|pasen|ponga|pongan|aprueb\w*|suba|suban|cambie|cambien|acredite\w*)",
            r"cheat\w*",
        ),
    ),
    (
        "hacking",
        _rx(
            r"hack\w*|jacke\w*|jaque\w*|crack\w*|phishing|keylogger\w*|malware|ransomware|troyano",
            r"(robar|robarle|robarles|sacarle|sacarles|conseguir|obtener|adivinar|vender|vendo|"
            r"descifrar|averiguar|saber)( \w+){0,3} (la |las |su |sus )?(contrasena|contrasenas|"
            rf"password|passwords|claves|nip)( \w+){{0,3}} (de|del) {_OTHERS}",
            r"(robar|robarle|robarles|sacarles|vender|vendo|descifrar|fuerza bruta)( \w+){0,3} "
            r"(contrasenas|passwords|claves)",
            r"(robarle|robarles|sacarle|sacarles)( \w+){0,2} (la |las |su |sus )?(contrasena|"
            r"contrasenas|password|claves)",
            r"(link|liga|enlace|pagina|sitio) falso",
            r"(contrasena|contrasenas|password|passwords|sesion|correo institucional)"
            rf" (de|del) {_OTHERS}",
            r"(cuenta|cuentas|correo|usuario|sel)( institucional| del sel)? (de|del) (otro|otra|"
            r"otros|"
            r"un profe\w*|una profe\w*|el profe\w*|la profe\w*|mi ex|mi novi\w*|alguien|"
            r"un companer\w*|una companer\w*|mi companer\w*|un maestr\w*|una maestr\w*|"
            r"el maestr\w*|la maestr\w*|un profesor\w*|una profesor\w*|el profesor\w*|"
            r"la profesora|todos los alumnos)",
            r"(entrar|meterme|acceder|ingresar|loguearme|entro|me meto)( \w+){0,4} (con|a|en) "
            r"(la|su) cuenta (de|ajena)",
            r"(entrar|meterme|acceder|ingresar|me meto)( \w+){0,3} (al |a la )?(servidor|"
            r"base de datos|sistema|sel)( \w+){0,8} (cambiar|modificar|subir|alterar|borrar|"
            r"poner|ponerme|ponerle)( \w+){0,3} (calificacion\w*|mb|promedio|notas|datos)",
            r"(vulnerar|vulnerabilidad\w*|tumbar|tirar)( \w+){0,2} (el|la) (sel|sistema|pagina|"
            r"servidor|portal)",
            r"clon\w*( \w+){0,2} (credencial|tarjeta|cuenta)",
            r"(entrar|acceder|meterme|ingresar)( \w+){0,3} (base de datos|servidor|servidores)",
            r"(cambiarle|cambiar|saber|adivinar|sacar|robar)( \w+){0,1} su contrasena",
            r"(saltar|saltarme|brincar|brincarme|evadir|quitar|quitarme|burlar)( \w+){0,2} "
            r"(el |la )?(bloqueo|candado|captcha|verificacion)( \w+){0,4} (sin pagar|sin que|sin "
            r"autorizacion|hackeando|con un script|con un bot)",
            r"(descargar|sacar|robar|extraer)( \w+){0,3} (datos|informacion) (de|personales de) "
            r"(todos|otros|los) (alumnos|estudiantes)",
            r"steal\w*|(classmate|someone|another student|teacher|professor) s (password|account)",
            r"(get|break|log) into( \w+){0,3} (account|email|system|database)",
            r"(sql injection|inyeccion sql|inyeccion de sql|ddos|fuerza bruta|brute force)",
        ),
    ),
    (
        "theft",
        _rx(
            r"(como|puedo|quiero|voy a|ayudame a|forma de|manera de) (robar|robarme|robarle|"
            r"robarles)|robarme (un|una|el|la|los|las)|(como|donde) (robo|me robo|le robo)",
            r"(sin que|para que no) (suene|sonara|detecte)( \w+){0,2} (alarma|sensor|arco)",
            r"(quitarle|sacarle|bajarle)( \w+){0,2} (la cartera|el celular|el cel|la bolsa|"
            r"la mochila)( \w+){0,6} sin que",
            r"(steal|shoplift)\w*",
        ),
    ),
    (
        "animal_harm",
        _rx(
            r"(matar|mato|envenen\w*|veneno|lastimar|maltrat\w*|golpear|patear|quemar|ahogar|"
            r"tortur\w*|deshacerme de|atropellar)( \w+){0,4} (gatos?|gatitos?|perros?|perritos?|"
            r"animales|palomas|pajaros|ardillas|mascotas?|cats?|dogs?|animals)",
            r"(gatos?|gatitos?|perros?|perritos?|animales|palomas|ardillas|cats?|dogs?)"
            r"( \w+){0,10} (envenen\w*|veneno|matarlos|matarlas|eliminarlos|tortur\w*|poison\w*|"
            r"kill)",
            r"(poison|kill|hurt)( \w+){0,3} (cats?|dogs?|animals?)",
        ),
    ),
    (
        "drugs",
        _rx(
            # buying, selling, making or bringing drugs (mentioning them is not enough)
            r"(consig\w*|conseguir|compr\w*|vend\w*|cocin\w*|prepar\w*|sintetiz\w*|fabric\w*|"
            r"hacer|distribu\w*|meter|pasar|cultivar|sembrar|donde hay|traer|surtir)( \w+){0,3} "
            r"(mota|tachas|cocaina|perico|metanfetamina|marihuana|mariguana|lsd|mdma|extasis|"
            r"fentanil\w*|heroina|droga|drogas|ketamina|anfetamina\w*|porros?)",
            r"(consig\w*|conseguir|compr\w*|vend\w*|cocin\w*|prepar\w*|sintetiz\w*|fabric\w*)"
            r"( \w+){0,3} (cristal|meth|weed|acidos|hongos|piedra)",
            r"(mota|tachas|cocaina|metanfetamina|marihuana|mariguana|fentanil\w*|drogas?|lsd|mdma|"
            r"extasis|perico)( \w+){0,6} (donde|quien|dealer|vende|venden|consigo|compro|fiesta|"
            r"campus)",
            r"narcomenudeo|dealer",
            r"(meter|meto|pasar|paso|introducir|vender|vendo)( \w+){0,2} (alcohol|chelas|cervezas|"
            r"botellas|drogas|mota|vodka|tequila)( \w+){0,3} (campus|uni|universidad|escuela|salon|"
            r"biblioteca|sin que)",
            r"(buy|sell|make|cook|get|find)( \w+){0,3} (drugs|meth|cocaine|weed|molly|ecstasy|lsd)",
        ),
    ),
    (
        "weapons",
        _rx(
            r"pistola\w*|revolver|rifle|escopeta|cuchillo\w*|navaja\w*|machete|explosiv\w*|"
            r"molotov|municion\w*|balas|(un|una|el|mi|las|unas) armas?( de fuego| blanca)?",
            r"(vend\w*|compr\w*|consig\w*|conseguir|traer|meter|llevar|fabricar)( \w+){0,2} "
            r"(armas?|pistolas?|cuchillos?|navajas?)",
            r"(poner|hacer|fabricar|armar|construir|llevar|meter)( \w+){0,2} (una )?bomba|"
            r"amenaza de bomba|bomba casera",
            r"(gun|guns|knife|bomb|explosives?)",
        ),
    ),
    (
        "violence",
        _rx(
            # hurting, threatening or drugging other people ("me mato estudiando" is not)
            r"(matar|mato|asesinar|golpear|apunalar|acuchillar|balacear|envenenar|secuestrar|"
            r"atropellar|lastimar|abusar de|violar|disparar|dispararle) (a|al) \w+",
            r"(hacer|cometer|planear|planeo) (una )?(masacre|matanza|balacera|tiroteo)",
            r"(matar|asesinar|golpear|madrear|apunalar|acuchillar|balacear|envenenar|secuestrar|"
            r"violar|lastimar|atropellar|drogar)(lo|la|los|las|le|les)",
            r"dispararle|quemarle|partirle la (madre|cara)|romperle la (madre|cara)|hacerle dano",
            r"(lo|la|los|las|le|les) (voy a|vamos a|quiero|pienso) (matar|golpear|madrear|apunalar|"
            r"balacear|lastimar|pegar|romper la cara|partir la cara|desaparecer)",
            r"me las (va|van) a pagar|hacerle la vida imposible|arruinarle la vida|que sufra",
            r"(echarle|aventarle|tirarle) (acido|gasolina|acido muriatico)",
            r"(incendiar|prenderle fuego|quemar)( \w+){0,2} (el|la|los) (edificio|salon|oficina|"
            r"ventanilla|escuela|universidad|carro|coche)",
            r"(quiero|quisiera|voy a|vamos a|como|puedo|podria|ayudame a|hay que|para|forma de)"
            r"( \w+){0,1} (asustar|amenazar|intimidar|extorsionar|chantajear|acosar|acechar|"
            r"stalkear|vengarme|desquitarme)(la|lo|las|los|le|les)?",
            r"(como|donde|cuando) (le |la |lo |los |las )?(asusto|amenazo|intimido|extorsiono|"
            r"chantajeo|acoso)",
            r"(pegarle|golpearle|le pego|darle una golpiza|agarrar a golpes|madrazos)( \w+){0,2} "
            r"(al|a la|a mi|a un|a una|a los|a las) (profe|profa|profesor\w*|maestr\w*|"
            r"companer\w*|compa|coordinador\w*|roomie|ex|novi\w*|vigilante|guardia|ventanill\w*)",
            r"para que me tenga(n)? miedo|darle un (susto|escarmiento)",
            r"(echarle|ponerle)( \w+){0,3} (a|en) (su|la|el) (comida|bebida|cafe|agua|refresco)"
            r"( \w+){0,4} para que (se enferme|se muera|le haga dano|se intoxique)",
            r"(pastillas|somnifer\w*|droga\w*|algo|clonazepam|rivotril|burundanga)( \w+){0,6} en "
            r"(el|su|la|sus|los|las) (cafe|bebida|vaso|agua|refresco|comida|chela|cerveza|trago)",
            r"(escribir|redactar|mandar|enviar|escribeme|redactame|redacta|escribe|manda)"
            r"( \w+){0,3} (una )?(amenaza|mensaje amenazante|carta amenazante)",
            r"(hacer|hago|como) explotar|(scare|intimidate|blackmail|threaten|beat up)( \w+){0,2}",
            r"emborrachar(la|lo) para|para que no (despierte|se despierte)",
            r"(difundir|subir|publicar|pasar|vender|exhibir|filtrar)( \w+){0,3} (fotos|videos|"
            r"pack|nudes)( \w+){0,3} (de mi ex|intimas|intimos|desnud\w*|de ella|de el)",
            r"doxe\w*",
            r"(kill|hurt|beat up|threaten|poison|stab|shoot) (him|her|them|my|a|the|someone)",
        ),
    ),
)

# Exceptions: the student is the victim or checks a document, not the one doing harm.
NOT_HARMFUL = {
    "hacking": _rx(
        r"me (hackearon|hackeo|jaquearon|han hackeado|hackea{0,1}ron)|hackearon (mi|mis)|"
        r"(pueden|podrian) hackear(me)?",
    ),
    "forgery": _rx(
        r"(verific|valid|comprob|comprueb|checar|checo|saber)\w* (si|que)( \w+){0,5} (no )?"
        r"(es|sea|son|sean) (falso|falsa|falsos|falsas|apocrif\w*|autentic\w*|valid\w*|original)",
    ),
}

# The office itself is asked for a copy ("perdí mi credencial, ¿la pueden falsificar?"): a
# confused way of asking for a replacement, answered with the replacement procedure.
ASKS_OFFICE_FOR_COPY = _rx(
    r"(pueden|podrian|puede|podria|me pueden|me podrian|ustedes)( \w+){0,2} "
    r"(falsificar|clonar|copiar)(la|lo|las|los|mela|melo)?",
)


# ---------------------------------------------------------------- 3. chit-chat

# (reason, pattern) removed from the folded text; chit-chat when nothing of substance is left
CHITCHAT: tuple[tuple[str, re.Pattern], ...] = (
    (
        "identity",
        _rx(
            r"(eres|seras|es usted|estoy hablando con) (un |una )?(bot|robot|chatbot|humano|humana|"
            r"persona|maquina|ia|inteligencia artificial|programa|de verdad|real|chatgpt|gpt|"
            r"gemini|alexa|siri|asistente virtual)"
            r"( o (un |una )?(bot|robot|humano|humana|persona|maquina|ia|real)( de verdad)?)?"
            r"( de verdad)?",
            r"(quien|que) (eres|es usted)( tu)?",
            r"quien (te (hizo|creo|programo|entreno|invento)|esta detras)",
            r"como te llamas|cual es tu nombre|tienes nombre|como se llama usted",
            r"(tu )?(nunca|no) (duermes|descansas|te cansas|te aburres|comes)( de \w+( \w+){0,3})?",
            r"(tienes|sientes) (sentimientos|emociones|novia|novio|hambre|suenio|sueno|vida)",
            r"cuantos anos tienes|donde vives|te gusta tu (trabajo|chamba)",
            r"(sigues|estas|hay alguien|alguien) (ahi|ahi alguien|ahi todavia|despierto|activo|"
            r"en linea)",
            r"me (escuchas|lees|entiendes)",
            r"como (estas|te va|andas|te encuentras|se encuentra|esta usted|va tu dia|te fue|"
            r"amaneciste)",
            r"que (haces|tal|tal tu dia|cuentas|hay de nuevo)",
            r"cuentame (un chiste|algo)",
            r"con quien (hablo|estoy hablando)",
            r"(que|en que) (cosas )?(puedes|me puedes|sabes|me podrias) (hacer|ayudar\w*|responder|"
            r"contestar)|para que sirves|que sabes hacer",
            r"(me llamo|mi nombre es) \w+( \w+)?",
            r"(eres|es usted) (mujer|hombre|nino|nina|chavo|chava|(el|la) mejor)( o (mujer|"
            r"hombre))?|"
            r"de donde eres|donde estas|como funcionas|me extranaste",
            r"hablas (ingles|espanol|otro idioma|otros idiomas|frances)|do you speak",
        ),
    ),
    (
        "smalltalk",
        _rx(
            r"(tu|cual es tu) (color|comida|pelicula|cancion|musica|serie|equipo|"
            r"libro) favorit[oa]",
            r"te gusta\w*( el| la| los| las)? \w+|que estas haciendo",
            r"(estas|estoy) (enojad\w*|triste|feliz|bien|cansad\w*|aburrid\w*|ocupad\w*)",
            r"(estas|esta|estan|se encuentra) (disponible|disponibles|atendiendo|en linea)",
            r"que (aburrido|bonito|feo|padre|lindo) (esta|estuvo) el dia( de)?( hoy)?",
            r"(cuentame|me cuentas|cuentas|sabes) (un )?chiste|te puedo contar algo",
            r"(como|que tal) (va|van) (todo|las cosas|tu dia)|todo bien|que me cuentas",
            r"espero que (bien|estes bien|este bien|todo (bien|este bien))",
            r"(platicar|platicamos|platica|hablar|charlar|conversar) (conmigo( un rato)?|un rato)",
            r"me siento (sol[oa]|aburrid[oa]|triste|feliz|bien|mal|contenta|contento)",
            r"(un|te mando un|mando un|muchos) (abrazo|abrazos|beso|besos)",
            r"(hay )?alguien (que me (atienda|ayude|pueda ayudar|pueda atender)|disponible)",
            r"eres (muy |un |una )?(inutil|tont[oa]|lent[oa]|genial|lo maximo|un amor|un sol|"
            r"muy amable|amable|inteligente|list[oa]|chid[oa]|buena onda|lind[oa]|bonit[oa])",
            r"(no sirves|no me sirves)( para nada)?|te quiero( mucho)?|te amo|te odio|"
            r"me caes (bien|mal|super bien)",
            r"are you (a )?(bot|human|real|there)|who are you|what is your name|how are you",
        ),
    ),
    (
        "thanks",
        _rx(
            r"(muchas |mil |muchisimas |infinitas )?gracias( por (todo|la ayuda|tu ayuda|su ayuda|"
            r"la informacion|la info|tu tiempo|responder|contestar|la respuesta))?",
            r"te lo agradezco|se (lo )?agradece|muy amable|que amable|te pasaste|me (ayudaste|"
            r"sirvio|ayudo) (mucho|muchisimo|bastante)|me sirvio|muy util|excelente servicio",
            r"thank you( so much| very much)?|thanks( a lot)?|many thanks|thx|ty|"
            r"gracias igualmente",
            r"(fue|fuiste|ha sido|has sido) (usted )?(muy )?(amable|de gran ayuda|muy util)|"
            r"gracias (de todos modos|de todas formas|por su atencion|por tu atencion)|"
            r"me salvaste( la vida)?|eres lo maximo|te debo una|que buena onda|buen trabajo|"
            r"excelente trabajo|muy bien hecho",
        ),
    ),
    (
        "goodbye",
        _rx(
            r"adios|bye|bye bye|chao|chau|nos vemos|ahi nos vemos|nos leemos|hasta (luego|pronto|"
            r"manana|la proxima|despues)|me voy|me retiro|cuidate|cuidese|see you|goodbye",
            r"que (tengas|tenga|pases|pase) (un |una )?(muy )?(buen|buena|bonito|bonita|excelente|"
            r"lindo|linda|feliz) (dia|fin|fin de semana|tarde|noche|semana)",
            r"buen (fin|fin de semana|dia)|bonito dia|feliz (dia|fin|noche)|"
            r"(bonita|buena|linda|excelente|feliz) (tarde|noche|semana)|te cuidas",
        ),
    ),
    (
        "help",
        _rx(
            # asks for help without saying with what yet
            r"(puedo|podria) (hacerte|hacerle|hacerles) una (pregunta|consulta)( personal)?|"
            r"te (puedo|podria) hacer una (pregunta|consulta)( personal)?|"
            r"(me )?(puedes|podrias|puede|podria|pueden|podrian) ayudar(me)?|me ayudas|me ayuda|"
            r"necesito (ayuda|informacion|info)|ayudame|ayuda por favor|(tengo|traigo) una "
            r"(pregunta|duda|consulta)|una (pregunta|duda|consulta)|help",
        ),
    ),
    (
        "greeting",
        _rx(
            r"hola|buen (dia|dias)|buenos (dias|tardes|noches)|buenas( tardes| noches| dias)?|"
            r"que onda|que hubo|quiubo|quiubole|que hay|que pex|que pedo|hey|hi|hello|"
            r"buenas buenas|feliz (navidad|ano nuevo|ano)|saludos( desde \w+| cordiales)?|saludo|"
            r"(solo )?(queria|quiero|paso a|pase a) saludar(te|lo|la)?|"
            r"es mi primera vez (usando|en) (este|el) (chat|asistente)|"
            r"de nuevo|dios te bendiga|bendiciones",
            r"good (morning|afternoon|evening|night)|hi there|hey there|see ya",
        ),
    ),
    (
        "acknowledgement",
        _rx(
            # longer phrases first: the first alternative that matches is removed
            r"ya quedo|ya vi|ya entendi|no (le )?entendi|no entiendo|va que va|sale y vale|"
            r"oki doki|de acuerdo|que padre|que chido|esta bien|de nada|a ver|no manches|"
            r"no te preocupes|no pasa nada|no hay problema|me equivoque|lo siento|sorry|"
            r"(ese|este) mensaje (era|no era) (pa|para) (mi|otra|otro)( \w+)?|ignoralo|"
            r"(ya )?me quedo (claro|clarisimo)|(ya )?quedo claro|(disculpa|disculpe|perdon|perdona)"
            r"( por)? la molestia",
            r"ok|okay|okey|oki|okas|va|vale|sale|perfecto|entendido|entiendo|listo|excelente|"
            r"genial|claro|ya|si|no|nel|simon|bueno|bien|super|chido|orale|andale|aja|ajam|ah|"
            r"ahh|oh|mmm|hmm|mande|jaja\w*|jeje\w*|jiji\w*|xd|lol",
        ),
    ),
)

# what may remain of a chit-chat message: fillers, vocatives, "una pregunta"
_FILLER = set(
    [
        "a",
        "al",
        "alguien",
        "amigo",
        "amiga",
        "asistente",
        "bot",
        "de",
        "del",
        "el",
        "en",
        "es",
        "esta",
        "joven",
        "la",
        "las",
        "lo",
        "los",
        "me",
        "mi",
        "muy",
        "oiga",
        "oigan",
        "oye",
        "por",
        "favor",
        "pues",
        "que",
        "se",
        "senor",
        "senora",
        "senorita",
        "te",
        "tengo",
        "todo",
        "todos",
        "tu",
        "un",
        "una",
        "usted",
        "y",
        "pregunta",
        "preguntita",
        "preguntar",
        "preguntarte",
        "duda",
        "dudita",
        "dudas",
        "consulta",
        "ayuda",
        "ayudar",
        "ayudarme",
        "ayudas",
        "puedes",
        "podrias",
        "puede",
        "podria",
        "hacer",
        "ahi",
        "cse",
        "disculpa",
        "disculpe",
        "perdon",
        "hoy",
        "otra",
        "vez",
        "igualmente",
        "tambien",
        "ti",
        "ustedes",
        "nada",
        "mas",
        "eso",
        "era",
        "seria",
        "todas",
        "entonces",
        "ahora",
        "luego",
        "ahorita",
        "mucho",
        "muchisimo",
        "tan",
        "rapido",
        "rapidito",
        "algo",
        "quiero",
        "queria",
        "quisiera",
        "saber",
        "consultar",
        "necesito",
        "hacerte",
        "hacerle",
        "and",
        "you",
        "to",
        "i",
        "so",
        "o",
        "e",
        "u",
        "con",
        "para",
        "sobre",
        "una",
        "bueno",
        "pero",
        "rapida",
        "rapidita",
        "pequena",
        "chiquita",
        "sencilla",
        "carnal",
        "compa",
        "bro",
        "hermano",
        "mijo",
        "mija",
        "wey",
        "guey",
        "we",
    ]
)


def _chitchat_reason(folded: str) -> str | None:
    """The kind of chit-chat when the message is nothing but chit-chat, else None."""
    rest, reasons = folded, []
    for reason, pattern in CHITCHAT:
        rest, found = pattern.subn(" ", rest)
        if found:
            reasons.append(reason)
    if any(w not in _FILLER for w in rest.split()):
        return None
    if not reasons:  # only fillers: "oye", "una pregunta", "disculpa"
        return "help"
    return reasons[0]  # in the order of CHITCHAT: identity first, acknowledgement last


# ---------------------------------------------------------------- 4. near misses

# (reason, pattern) on the folded text: sounds like a school question, but the office
# does not answer it whatever the retrieval score
_PEOPLE = (
    r"(mi |la |el |un |una |su )?(amig[oa]s?|novi[oa]|compa|compas|companer[oa]s?|roomie|"
    r"hij[oa]|herman[oa]|ex|prim[oa]|vecin[oa]|maestr[oa]|profe|profa|profesor[a]?|"
    r"otro alumno|otra alumna|otra persona|otros alumnos)"
)
NEAR_MISS: tuple[tuple[str, re.Pattern], ...] = (
    (
        "third_party_data",
        _rx(
            # another person's grades, average, ID number or contact details
            r"(calificacion\w*|notas?|promedio|matricula|celular|telefono|numero|whatsapp|"
            r"correo personal|direccion|domicilio|instagram|facebook|redes sociales|horario)"
            rf"( \w+){{0,3}} (de|del|saco|tiene|obtuvo|lleva) {_PEOPLE}",
            r"(su|sus) (celular|telefono|numero de (celular|telefono)|whatsapp|correo personal|"
            r"direccion|domicilio|instagram|facebook|redes sociales)",
            r"(telefonos|numeros|correos|direcciones|datos personales|calificaciones) de (todos|"
            r"los|"
            r"otros) (los )?(alumnos|estudiantes|companeros)",
            r"(que materias|cuantas materias|si ha faltado|sus faltas|sus calificaciones)"
            r"( \w+){0,4} (mi hij[oa]|mi herman[oa]|mi novi[oa])",
        ),
    ),
    (
        "teacher_opinion",
        _rx(
            r"(profe|profa|profesor\w*|maestr[oa]s?|doctor[a]?)( \w+){0,6} (es|son) "
            r"(barco|barcos|buen[oa]|mal[oa]|facil|dificil|estricto|estricta|barcaza|buena onda)",
            r"(que|cual|cuales|quien) (profe|profa|profesor\w*|maestr[oa]) (es|son) "
            r"(barco|mejor|buen[oa]|facil)",
            r"(buen|mal|mejor) (profe|profesor|maestro|maestra|profa)",
            r"(que|cual|cuales) (profe|profa|profesor\w*|maestr[oa]s?)( \w+){0,2} "
            r"(recomiendas|conviene|es mejor)",
            r"(califica|evalua) mas (facil|duro|dificil|barco)",
            r"reprueba a todos",
            r"(como|que tal) (es|son|esta|califica)? ?(el|la|los|las) (profe|profa|profesor\w*|"
            r"maestr[oa]s?)",
            r"(es|son) (buen[oa]|mal[oa]|barco|estrict[oa]|exigente|dificil|facil|pesad[oa]|"
            r"buena onda|mala onda) (el|la|los|las) (profe|profa|profesor\w*|maestr[oa]s?)",
            r"(conviene|recomiendas)( \w+){0,3} (con|el|la|al|a la)( \w+){0,1} "
            r"(profe|profa|profesor\w*|maestr[oa]|grupo)",
        ),
    ),
    (
        "exam_content",
        _rx(
            r"(que|cuales) temas (vienen|entran|van a venir|vendran|trae)",
            r"(que|cuales) (preguntas|ejercicios) (vienen|van a venir|trae) (en )?el examen",
        ),
    ),
)

# (reason, pattern): topics that are usually someone else's business, but whose words also
# appear in real questions ("la credencial no pasa en el gimnasio", "constancia para la visa").
# A message with one of these is answered only when retrieval is confident: its best score
# must reach the higher, separately calibrated ``Thresholds.with_cue``.
OFF_TOPIC_CUES: tuple[tuple[str, re.Pattern], ...] = (
    (
        "other_institution",
        _rx(
            # other universities and schools, government offices and their procedures
            r"unam|ipn|sat|sre|itam|udeg|uanl|buap|ibero|anahuac|conalep|comipems|ceneval|cch|"
            r"infonavit|afores?|inm|saes|siae|dgae|renapo|prepa en linea",
            r"tec de monterrey|universidad de guadalajara|colegio de bachilleres|alianza francesa|"
            r"british council|registro civil|servicio militar|cartilla militar|embajada|consulado|"
            r"pasaporte|licencia de (manejo|conducir)|e firma|efirma|declaracion anual|resico|"
            r"domicilio fiscal|study permit|visa de turista",
            r"(repongo|reponer|tramitar|tramito|sacar|saco|renovar|renuevo|perdi|"
            r"perdio)( \w+){0,2} "
            r"(la|mi) ine",
            r"credencial (del|de la) ine|credencial para votar|modulo del ine|semanas cotizadas",
            r"politecnico|universidad (del estado|estatal|autonoma|tecnologica) de",
        ),
    ),
    (
        "campus_service",
        _rx(
            # campus services other offices run: food, sports, culture, housing, jobs, places
            # (asked about as a service, not mentioned in passing: "en el gimnasio me dijeron
            # que mi credencial no está vigente" is a credential question)
            # (the service, not the word in passing: "la cafe", not "se le cayó café"; the lab's
            # computers, not "mi compu" with a SEL problem)
            r"cafeteria|la cafe|comedor|menu del dia|alberca|natacion|estacionamiento|estacionar|"
            r"cajones|lockers?|casilleros?|objetos perdidos|cajero automatico|papeleria|copiadora|"
            r"(imprimir|impresiones|copias) (barato|baratas|a color)|laboratorio de computo|"
            r"centro de computo|compus|(la|las) compus? (del|de la) \w+|wifi",
            r"(abre|cierra|horario del|inscribirme al|me inscribo al|inscribirse al|meterme al|"
            r"entrar al) gimnasio|"
            r"gimnasio( \w+){0,5} (abre|cierra|horario)",
            r"equipo representativo|visorias|audiciones|elecciones|planilla|"
            r"representantes estudiantiles|club(es)? de \w+",
            r"dormitorios?|residencias? (estudiantiles|universitarias|para (alumnos|estudiantes))|"
            r"casas? de (estudiantes|estudiante)",
            # vocational advice
            r"vale la pena estudiar|(que|cual) carrera (me conviene|elijo|escojo)",
            r"renta|rentar|roomie|depa|casa de huespedes|feria del empleo|bolsa de trabajo|"
            r"(busco|hay|ofrecen|conseguir) (chamba|trabajo|empleo)",
            # counselling and the infirmary, not the careers ("soy de Psicología", "Enfermería")
            r"salon [a-z] ?\d+|edificio [a-z]|cubiculo|asesorias|psicolog[oa]s?|"
            r"(atencion|apoyo|servicio|consulta) (de )?psicolog\w*|la enfermeria|dentista",
            r"canteen|parking|gym",
        ),
    ),
    (
        "homework_help",
        _rx(
            # doing the student's coursework: exercises, summaries, essays, translations
            r"(resuelve|resuelveme|resolver|balancea|balanceame|explicame|explica|resume|resumeme|"
            r"resumir|traduce|traduceme|traducir|hazme|redacta|redactame|escribeme|calcula|"
            r"calculame)( \w+){0,4} (ejercicio|ejercicios|ecuacion|problema|derivada|integral|"
            r"tarea|"
            r"ensayo|capitulo|libro|lectura|texto|resumen|poema|cuento|formula)",
            r"(tarea|ensayo|exposicion|examen|clase|lectura) de (matematicas|quimica|fisica|"
            r"historia|biologia|calculo|algebra|filosofia|sociologia|ingles|literatura|"
            r"estadistica)",
            r"mi tarea|como se dice|tema de tesis|for my (class|homework)|homework|explain",
            r"traduce\w* (al|a|en) (ingles|frances|aleman|italiano|portugues|japones|chino)",
        ),
    ),
    (
        "general_knowledge",
        _rx(
            # trivia, arithmetic, recipes, weather, sports, money, entertainment
            r"cuanto (es|son|da) (el )?\d+|raiz cuadrada|capital de \w+|(quien|que) (fue|era) (el|"
            r"la) "
            r"(primer|primera|presidente|autor|inventor)|(quien|que) (escribio|pinto|invento|"
            r"descubrio)",
            r"receta|como (se )?(cocina|prepara|preparo|hace un pastel)|calorias",
            r"clima|va a llover|temperatura|pronostico",
            r"(a que hora|cuando) juega|mundial|resultado del partido|liga mx",
            r"dolar|tipo de cambio|bitcoin|criptomonedas?",
            r"recomiendame (una|un|algun|alguna) (serie|pelicula|libro|cancion|restaurante|juego)",
            r"(what|who|how many|how much|when|where) (is|was|are|were|did|do)",
        ),
    ),
)


# ---------------------------------------------------------------- the guard


@dataclass(frozen=True)
class Thresholds:
    """What calibration learns, saved as ``guard.json`` next to the index."""

    out_of_scope: float = DEFAULT_THRESHOLD  # best retrieval score below this → out_of_scope
    with_cue: float = DEFAULT_CUE_THRESHOLD  # the same, for messages with an off-topic cue
    max_false_refusals: float = MAX_FALSE_REFUSALS
    calibration: dict = field(default_factory=dict)  # figures measured when it was chosen

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Thresholds:
        return cls(
            out_of_scope=float(data["out_of_scope"]),
            with_cue=float(data.get("with_cue", data["out_of_scope"])),
            max_false_refusals=float(data.get("max_false_refusals", MAX_FALSE_REFUSALS)),
            calibration=dict(data.get("calibration", {})),
        )


def _top_score(hits: Sequence) -> float:
    return max((float(h.score) for h in hits), default=0.0)


class Guard:
    """Classifies each message; ``classify`` is pure and fast (regexes + one comparison)."""

    def __init__(self, thresholds: Thresholds | None = None):
        self.thresholds = thresholds or Thresholds()

    def rules(self, text: str) -> GuardDecision | None:
        """The decision of the rules alone (steps 1–3 and near-miss cues), or None."""
        folded = fold(text)
        if SELF_HARM.search(folded):
            return GuardDecision("self_harm", "self_harm", 1.0)
        if INJECTION.search(folded) or FAKE_TAGS.search(text):
            return GuardDecision("refuse", "injection", 1.0)
        for reason, pattern in HARMFUL:
            if pattern.search(folded):
                if reason in NOT_HARMFUL and NOT_HARMFUL[reason].search(folded):
                    continue
                if reason == "forgery" and ASKS_OFFICE_FOR_COPY.search(folded):
                    continue
                return GuardDecision("refuse", reason, 1.0)
        if not folded:
            return GuardDecision("chitchat", "empty", 1.0)
        chitchat = _chitchat_reason(folded)
        if chitchat:
            return GuardDecision("chitchat", chitchat, 1.0)
        for reason, pattern in NEAR_MISS:
            if pattern.search(folded):
                return GuardDecision("out_of_scope", reason, 1.0)
        return None

    @staticmethod
    def cue(text: str) -> str | None:
        """The first off-topic cue of ``text`` (see ``OFF_TOPIC_CUES``), or None."""
        folded = fold(text)
        return next((reason for reason, p in OFF_TOPIC_CUES if p.search(folded)), None)

    def classify(self, text: str, hits: Sequence) -> GuardDecision:
        """``hits``: the retriever's results for ``text``, best first (``Hit.score`` in [0, 1])."""
        decided = self.rules(text)
        return decided if decided else self.by_score(_top_score(hits), self.cue(text))

    def by_score(self, score: float, cue: str | None = None) -> GuardDecision:
        """Step 4 on the best retrieval score: out of scope below the threshold (the higher
        ``with_cue`` one when the message has an off-topic cue), else answer."""
        if cue is not None and score < max(self.thresholds.with_cue, self.thresholds.out_of_scope):
            return GuardDecision("out_of_scope", cue, score)
        if score < self.thresholds.out_of_scope:
            return GuardDecision("out_of_scope", "low_retrieval_score", score)
        return GuardDecision("answer", "retrieval_match", score)

    # ------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / THRESHOLDS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.thresholds.to_dict(), ensure_ascii=False, indent=2)
        path.write_text(text + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Guard:
        path = Path(directory) / THRESHOLDS_FILE
        if not path.is_file():
            raise UserError(
                f"{path}: no guard thresholds "
                f"(run python -m gemma_cse.guard calibrate --index {directory})"
            )
        try:
            return cls(Thresholds.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: not a guard thresholds file ({err})") from err

    @classmethod
    def calibrated(
        cls, retriever, entries: Sequence[Entry], directory: str | Path | None = None
    ) -> Guard:
        """A guard for ``retriever`` over ``entries``: thresholds loaded from ``directory`` when
        saved there, else calibrated with ``calibration_protocol`` and saved there. Without a
        directory, a cache entry keyed by the entries, the retriever's settings and code and
        this module's rules is used (``$GEMMA_CSE_CACHE/guard/<key>``), so that a second start
        is instant. The calibration index scores like ``retriever`` (same class, embedder,
        weights, fields, fusion and topic descriptions), so its scores are on the same scale."""
        directory = Path(directory) if directory is not None else _cache_dir(retriever, entries)
        if (directory / THRESHOLDS_FILE).is_file():
            return cls.load(directory)
        guard = cls(calibration_protocol(list(entries), like(retriever))["thresholds"])
        with contextlib.suppress(OSError):  # a read-only cache costs a recalibration next time
            guard.save(directory)
        return guard


def _cache_dir(retriever, entries: Sequence[Entry]) -> Path:
    """``$GEMMA_CSE_CACHE/guard/<key>``: the key hashes what the thresholds depend on."""
    embedder = getattr(retriever, "embedder", None)
    settings = {
        "class": type(retriever).__name__,
        "embedder": getattr(embedder, "name", None),
        "weights": [round(float(w), 6) for w in getattr(retriever, "weights", [])],
        "fields": [round(float(w), 6) for w in getattr(retriever, "fields", [])],
        "descriptions": getattr(retriever, "descriptions", None),
        "fusion": str(getattr(retriever, "fusion", "")),
        "spelling": bool(getattr(retriever, "spelling", True)),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    key.update(json.dumps([asdict(e) for e in entries], ensure_ascii=False).encode())
    key.update(Path(__file__).read_bytes())  # new rules, new thresholds
    source = getattr(sys.modules.get(type(retriever).__module__), "__file__", None)
    if source and Path(source).is_file():  # new scoring, new thresholds
        key.update(Path(source).read_bytes())
    for path in (OUT_OF_SCOPE_FILE, BLIND_OUT_OF_SCOPE_FILE):
        if path.is_file():
            key.update(path.read_bytes())
    return cache_dir() / "guard" / key.hexdigest()[:16]


# ---------------------------------------------------------------- replies

_OFFER = (
    "inscripción y reinscripción, altas y bajas de UEA, calificaciones, constancias y "
    "certificados, credencial, servicio social, titulación, pagos, becas y el Sistema Escolar "
    "en Línea (https://sel.universidad.example)"
)
REPLIES = {
    "out_of_scope": (
        "Esa consulta no forma parte de los trámites que atiende la Coordinación de Sistemas "
        f"Escolares, así que no tengo información confiable para responderla. Con gusto te ayudo "
        f"con {_OFFER}. Para otros asuntos, revisa el portal https://cse.universidad.example o "
        "escríbenos a cse@universidad.example y te orientamos."
    ),
    "out_of_scope:third_party_data": (
        "Por protección de datos personales no podemos compartir calificaciones, matrícula ni "
        "datos de contacto de otras personas: cada alumno consulta los suyos en el Sistema "
        "Escolar en Línea (https://sel.universidad.example). Si tienes una duda sobre tus propios "
        f"trámites, con gusto te ayudo con {_OFFER}."
    ),
    "out_of_scope:teacher_opinion": (
        "No damos opiniones ni recomendaciones sobre profesores o grupos. La programación de "
        "grupos y horarios del trimestre la consultas en el Sistema Escolar en Línea "
        "(https://sel.universidad.example), y para dudas académicas puedes acudir a la "
        "Coordinación de Estudios de tu licenciatura. ¿Te ayudo con algún trámite escolar?"
    ),
    "refuse": (
        "No puedo ayudarte con eso. Si tienes una duda sobre un trámite escolar, con gusto te "
        f"oriento con {_OFFER}."
    ),
    "refuse:injection": (
        "Soy el asistente de la Coordinación de Sistemas Escolares y solo puedo ayudarte con "
        f"trámites escolares: {_OFFER}. ¿Qué trámite quieres consultar?"
    ),
    "self_harm": (
        "Siento mucho que estés pasando por esto; lo que sientes importa y no tienes que "
        "enfrentarlo en soledad. Si estás en peligro en este momento, llama al 911. Puedes hablar "
        "con alguien ahora mismo, gratis y a cualquier hora, en la Línea de la Vida: 800 911 2000. "
        "En la Universidad también puedes acudir al servicio de apoyo psicológico para "
        "estudiantes, y te sugerimos buscar a una persona de confianza que te acompañe. Cuando "
        "quieras, aquí seguimos para ayudarte a resolver cualquier trámite escolar."
    ),
    "chitchat": (
        "¡Hola! Soy el asistente de la Coordinación de Sistemas Escolares. ¿En qué te puedo "
        "ayudar? Por ejemplo, con constancias, reinscripción, credencial, servicio social o "
        "titulación."
    ),
    "chitchat:thanks": (
        "¡Con mucho gusto! Si tienes otra duda sobre tus trámites escolares, aquí estoy."
    ),
    "chitchat:goodbye": (
        "¡Hasta luego, que te vaya muy bien! Cuando tengas otra duda sobre tus trámites "
        "escolares, aquí estaré."
    ),
    "chitchat:identity": (
        "Soy el asistente virtual de la Coordinación de Sistemas Escolares (CSE): respondo dudas "
        "sobre trámites escolares con la información de la oficina. Si necesitas atención "
        "personal, escribe a cse@universidad.example o agenda una cita en Citas CSE. ¿En qué te "
        "ayudo?"
    ),
    "chitchat:acknowledgement": "¡Va! ¿Hay algo más en lo que te pueda ayudar?",
    "chitchat:smalltalk": (
        "¡Qué gusto platicar contigo! Yo solo sé de trámites escolares de la Coordinación de "
        "Sistemas Escolares, como constancias, reinscripción, credencial o servicio social. "
        "¿Hay algo de eso en lo que te pueda ayudar?"
    ),
}


def reply_for(decision: GuardDecision) -> str:
    """The office's reply for a non-answer decision (it never quotes the message)."""
    if decision.label == "answer":
        raise ValueError("an 'answer' decision is answered from the knowledge base")
    return REPLIES.get(f"{decision.label}:{decision.reason}", REPLIES[decision.label])


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Case:
    """One message with the label the guard should give it."""

    text: str
    expected: str  # a label of LABELS
    kind: str  # in_scope, heldout_topic, or an out-of-scope kind


def cases_from(in_scope_questions: Sequence[str], out_of_scope_items: Sequence) -> list[Case]:
    """Cases from in-scope questions (→ answer) and out-of-scope items: ``OutOfScope`` rows
    (→ their expected label) or plain strings (questions of held-out topics → out_of_scope)."""
    cases = [Case(q, "answer", "in_scope") for q in in_scope_questions]
    for item in out_of_scope_items:
        if isinstance(item, OutOfScope):
            cases.append(Case(item.text, EXPECTED_LABEL[item.expected], item.kind))
        else:
            cases.append(Case(str(item), "out_of_scope", "heldout_topic"))
    return cases


def _oos_prf(pairs) -> tuple[float, float, float]:
    tp = sum(c.expected == "out_of_scope" and d.label == "out_of_scope" for c, d in pairs)
    fp = sum(c.expected != "out_of_scope" and d.label == "out_of_scope" for c, d in pairs)
    fn = sum(c.expected == "out_of_scope" and d.label != "out_of_scope" for c, d in pairs)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def figures(cases: Sequence[Case], decisions: Sequence[GuardDecision]) -> dict:
    """Out-of-scope precision/recall/F1, false refusals (in-scope questions not answered),
    accuracy per kind and overall."""
    pairs = list(zip(cases, decisions, strict=True))
    precision, recall, f1 = _oos_prf(pairs)
    _, _, f1_set = _oos_prf([(c, d) for c, d in pairs if c.kind != "heldout_topic"])
    in_scope = [d for c, d in pairs if c.expected == "answer"]
    refused = sum(d.label != "answer" for d in in_scope)
    per_kind: dict[str, list[int]] = {}
    for c, d in pairs:
        per_kind.setdefault(c.kind, [0, 0])
        per_kind[c.kind][0] += c.expected == d.label
        per_kind[c.kind][1] += 1
    return {
        "out_of_scope_f1": round(f1, 4),
        "out_of_scope_f1_without_heldout_topics": round(f1_set, 4),
        "out_of_scope_precision": round(precision, 4),
        "out_of_scope_recall": round(recall, 4),
        "false_refusals": round(refused / len(in_scope), 4) if in_scope else 0.0,
        "in_scope_questions": len(in_scope),
        "accuracy": round(sum(c.expected == d.label for c, d in pairs) / len(pairs), 4),
        "per_kind": {k: f"{ok}/{n}" for k, (ok, n) in sorted(per_kind.items())},
        "cases": len(pairs),
    }


def decide(guard: Guard, retriever, cases: Sequence[Case], k: int = 3) -> list[GuardDecision]:
    return [guard.classify(c.text, retriever.search(c.text, k)) for c in cases]


def _middle(values: Sequence[float]) -> float:
    """The middle of a run of equally good thresholds: a margin on both sides."""
    return (min(values) + max(values)) / 2


def calibrate(
    guard: Guard,
    cases: Sequence[Case],
    scores: Sequence[float],
    max_false_refusals: float = CALIBRATION_FALSE_REFUSALS,
) -> Thresholds:
    """The retrieval-score thresholds that maximise out-of-scope F1 with false refusals at most
    ``max_false_refusals`` on the in-scope ``cases``.

    ``scores``: each case's best retrieval score, from an index that holds neither the case
    itself nor, for questions of held-out topics, their topic. Both thresholds are searched
    together (the one for messages with an off-topic cue is at least the main one) over the
    midpoints between observed scores; among equally good pairs, the middle of the best run of
    main thresholds, then the middle of the cue thresholds that go with it.
    """
    ruled = [guard.rules(c.text) for c in cases]
    cue = np.array([guard.cue(c.text) is not None for c in cases])
    score = np.asarray(scores, dtype=float)
    expected_oos = np.array([c.expected == "out_of_scope" for c in cases])
    in_scope = np.array([c.expected == "answer" for c in cases])
    fixed = np.array([r is not None for r in ruled])
    fixed_oos = np.array([r is not None and r.label == "out_of_scope" for r in ruled])
    fixed_refused = np.array([r is not None and r.label != "answer" for r in ruled])
    points = np.unique(np.r_[0.0, 1.0001, score])
    grid = np.r_[points[0], (points[:-1] + points[1:]) / 2, points[-1]]
    # no threshold above the best in-scope score: the data cannot tell those apart
    ceiling = float(score[in_scope].max()) if in_scope.any() else 1.0
    grid = grid[grid <= ceiling + 1e-9]

    best: list[tuple[float, float]] = []
    best_f1 = -1.0
    limit = max_false_refusals * max(int(in_scope.sum()), 1) + 1e-9
    for main in grid:
        low = score < main
        for with_cue in grid[grid >= main]:
            predicted = np.where(fixed, fixed_oos, low | (cue & (score < with_cue)))
            refused = np.where(fixed, fixed_refused, predicted)
            if (refused & in_scope).sum() > limit:
                continue
            tp = int((predicted & expected_oos).sum())
            fp, fn = int((predicted & ~expected_oos).sum()), int((~predicted & expected_oos).sum())
            f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
            if f1 > best_f1 + 1e-12:
                best_f1, best = f1, [(main, with_cue)]
            elif abs(f1 - best_f1) <= 1e-12:
                best.append((main, with_cue))
    if not best:
        raise UserError("no threshold keeps false refusals within the limit; check the rules")
    main = _middle([m for m, _ in best])
    nearest = min({m for m, _ in best}, key=lambda m: abs(m - main))
    with_cue = max(main, _middle([c for m, c in best if m == nearest]))
    thresholds = replace(
        guard.thresholds,
        out_of_scope=round(float(main), 4),
        with_cue=round(float(with_cue), 4),
        max_false_refusals=max_false_refusals,
    )
    tuned = Guard(thresholds)
    decisions = [
        r or tuned.by_score(float(s), guard.cue(c.text))
        for r, s, c in zip(ruled, score, cases, strict=True)
    ]
    ranges = {
        "best_range": [
            round(float(min(m for m, _ in best)), 4),
            round(float(max(m for m, _ in best)), 4),
        ],
        "best_range_with_cue": [
            round(float(min(c for _, c in best)), 4),
            round(float(max(c for _, c in best)), 4),
        ],
    }
    return replace(thresholds, calibration=figures(cases, decisions) | ranges)


# ---------------------------------------------------------------- the protocol


def half_of(key: str) -> str:
    """ "calibration" or "test", from a hash of ``key`` (stable across runs and machines)."""
    digest = int(hashlib.sha256(f"guard:{key}".encode()).hexdigest(), 16)
    return "calibration" if digest % 2 == 0 else "test"


def split_out_of_scope(items: Sequence) -> tuple[list, list]:
    """(calibration, test) halves of the out-of-scope set, by a hash of each item's id."""
    calibration = [i for i in items if half_of(i.id) == "calibration"]
    return calibration, [i for i in items if half_of(i.id) == "test"]


def _fold_of(key: str, i: int) -> int:
    """The calibration fold of an entry's ``i``-th asked question, rotated by a hash of the
    entry's id so that each fold holds every style of variant (the files list them in order)."""
    return (int(hashlib.sha256(key.encode()).hexdigest(), 16) + i) % CALIBRATION_FOLDS


def protocol_sets(entries: Sequence[Entry], items: Sequence[OutOfScope] | None = None) -> dict:
    """The calibration and test sets of the protocol (``make_splits``, seed 13).

    - in-scope questions: for calibration, every variant of the entries outside the held-out
      topics except their test ones (validation and training variants alike, cued ones
      included), each asked once of an index without it: ``CALIBRATION_FOLDS`` folds, each
      index holding the others' questions, as the deployed index holds all; for the test, the
      test questions, asked of the first fold's index (no index holds a test question);
    - out-of-scope: the out-of-scope sets (``out_of_scope.jsonl`` and the blind test's
      ``blind_out_of_scope.jsonl``) split in halves by id hash, plus every question of the
      held-out topics, the topics split in halves by hash; asked of the first fold's index.

    Returns {"folds": [{"index", "in_scope"}, ...], "calibration": {"out_of_scope"},
    "test": {"in_scope", "out_of_scope"}}.
    """
    splits = make_splits(list(entries))
    if items is None:
        items = [*load_out_of_scope(), *load_out_of_scope(BLIND_OUT_OF_SCOPE_FILE)]
    heldout = set(splits.heldout_topics)
    kept = splits.without_heldout(list(entries))
    kept_ids = {e.id for e in kept}
    test = {ex.question for ex in splits.test}
    asked = {e.id: [q for q in e.variants if q not in test] for e in kept}
    fold_of = {(e.id, q): _fold_of(e.id, i) for e in kept for i, q in enumerate(asked[e.id])}
    folds = []
    for fold in range(CALIBRATION_FOLDS):
        index = [
            replace(e, variants=tuple(q for q in asked[e.id] if fold_of[e.id, q] != fold))
            for e in kept
        ]
        in_scope = [q for e in kept for q in asked[e.id] if fold_of[e.id, q] == fold]
        folds.append({"index": index, "in_scope": in_scope})
    calibration_items, test_items = split_out_of_scope(items)
    sets: dict = {"folds": folds}
    for half, oos in (("calibration", calibration_items), ("test", test_items)):
        topics_questions = [
            q
            for e in entries
            if e.topic in heldout and half_of(e.topic) == half
            for q in e.questions
        ]
        sets[half] = {"out_of_scope": list(oos) + topics_questions}
    sets["test"]["in_scope"] = [ex.question for ex in splits.test if ex.entry.id in kept_ids]
    return sets


def like(retriever) -> Callable[[list[Entry]], object]:
    """Builds retrievers over other entries that score like ``retriever``."""
    options = {
        name: getattr(retriever, name)
        for name in ("embedder", "weights", "fields", "fusion", "spelling", "descriptions")
        if hasattr(retriever, name)
    }
    for name in ("weights", "fields"):
        if name in options:
            options[name] = list(options[name])
    return lambda entries: type(retriever)(entries, **options)


def calibration_protocol(
    entries: Sequence[Entry],
    build_retriever: Callable[[list[Entry]], object],
    guard: Guard | None = None,
    items: Sequence[OutOfScope] | None = None,
) -> dict:
    """Calibrate on the calibration half, measure on both: {"thresholds", "calibration", "test"}."""
    sets = protocol_sets(entries, items)
    guard = guard or Guard()
    cases: list[Case] = []
    scores: list[float] = []
    first = None  # the first fold's index also answers the test half; the others are dropped
    for fold in sets["folds"]:
        retriever = build_retriever(fold["index"])
        if first is None:
            first = retriever
        asked = cases_from(fold["in_scope"], [] if cases else sets["calibration"]["out_of_scope"])
        cases += asked
        scores += [_top_score(retriever.search(c.text, 3)) for c in asked]
    thresholds = calibrate(guard, cases, scores)
    cases = cases_from(sets["test"]["in_scope"], sets["test"]["out_of_scope"])
    test = figures(cases, decide(Guard(thresholds), first, cases))
    calibration = {k: v for k, v in thresholds.calibration.items() if not k.startswith("best_")}
    embedder = getattr(getattr(first, "embedder", None), "name", None)
    measured = thresholds.calibration | {"test": test, "embedder": embedder}
    return {
        "thresholds": replace(thresholds, calibration=measured),
        "calibration": calibration,
        "test": test,
    }


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gemma_cse.guard",
        description="Calibrate the guard's thresholds (figures on the calibration and test "
        "halves), or classify one message.",
    )
    parser.add_argument("command", choices=["calibrate", "classify"])
    parser.add_argument(
        "--index",
        help="retrieval index directory: calibrate writes guard.json there (building the index "
        "first if there is none); classify reads both (default: the chatbot's own cached index "
        "and thresholds)",
    )
    parser.add_argument("--kb", default=None, help="knowledge base file or folder")
    parser.add_argument(
        "--embedder",
        choices=["use", "e5", "none"],
        default="use",
        help="sentence embedder when no index is given (default: %(default)s)",
    )
    parser.add_argument("--text", help="with classify: the message")
    args = parser.parse_args(argv)
    if args.command == "classify" and not args.text:
        raise UserError("classify needs --text")
    from gemma_cse.retrieval import Retriever

    embedder = None if args.embedder == "none" else args.embedder
    index = Path(args.index) if args.index else None
    entries = load_entries(args.kb) if args.kb else load_entries()
    if args.command == "classify":
        if index is not None:  # both read, nothing built: a wrong path fails at once
            guard, retriever = Guard.load(index), Retriever.load(index)
        else:  # what the chatbot decides with
            retriever = Retriever.cached(entries, embedder)
            guard = Guard.calibrated(retriever, entries)
        decision = guard.classify(args.text, retriever.search(args.text, 3))
        used = {
            "out_of_scope": guard.thresholds.out_of_scope,
            "with_cue": guard.thresholds.with_cue,
        }
        print(json.dumps(asdict(decision) | {"thresholds": used}, ensure_ascii=False))
        if decision.label != "answer":
            print(reply_for(decision))
        return 0
    if index is not None and (index / "index.json").is_file():
        retriever = Retriever.load(index)
    else:
        retriever = Retriever(entries, embedder=embedder)
        if index is not None:
            retriever.save(index)
    report = calibration_protocol(entries, like(retriever))
    thresholds = report["thresholds"]
    print(f"thresholds: out_of_scope {thresholds.out_of_scope}, with_cue {thresholds.with_cue}")
    for half in ("calibration", "test"):
        print(f"{half}: {json.dumps(report[half], ensure_ascii=False)}")
    if index is not None:
        print(f"saved {Guard(thresholds).save(index)}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
