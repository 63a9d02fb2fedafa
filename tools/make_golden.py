"""Write the llama.cpp reference data that ``tests/test_gguf_convert.py`` checks against.

Why this exists: the embedded model reaches KerasHub through our own GGUF conversion
(``gemma_cse.gguf_convert``), which repairs llama.cpp quirks by hand (RMSNorm weights stored
as 1 + w, a SentencePiece vocabulary rebuilt from GGUF metadata). llama.cpp is the program the
GGUF was made for, so it is the reference: this script runs llama-cpp-python on the very same
GGUF and records

* the token ids of varied Spanish strings (accents, ñ, ¿¡, digits, emoji, URLs, runs of
  spaces, tabs, newlines, chat markers), tokenized without BOS and with special tokens parsed;
* the top-5 next tokens, with their logits, after each of a set of Spanish prompts (BOS + text);
* the perplexity of ``tests/golden/parrafo_es.txt``.

With ``--dequantize`` it runs llama.cpp on a float32 copy of the GGUF instead (every tensor
dequantized by gguf's own code, the KV cache in float32) and writes
``gemma3_270m_llamacpp_f32.json``: on quantized weights llama.cpp also quantizes the
activations to 8 bits before each product, which moves logits by up to ~0.7; on float32 weights
it computes in float32 as KerasHub does, so the two should agree to rounding.

The tests then need neither llama.cpp nor this script: only the JSON it writes. Rerun it (and
commit the JSON) when the strings, prompts, paragraph or embedded model change. Needs the
``golden`` extra: ``pip install -e .[golden]`` (llama-cpp-python builds from source, ~7 min).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "golden" / "gemma3_270m_llamacpp.json"
DEQUANTIZED_OUT = ROOT / "tests" / "golden" / "gemma3_270m_llamacpp_f32.json"
PARAGRAPH = ROOT / "tests" / "golden" / "parrafo_es.txt"

# Tokenized without BOS, special tokens parsed. Each line aims at a different tokenizer path.
STRINGS = [
    "Hola, ¿cómo estás?",
    "¡Buenos días! La matrícula abre el lunes.",
    "El niño comió ñoquis con su abuela en Logroño.",
    "Pingüino, cigüeña y vergüenza llevan diéresis.",
    "ÁÉÍÓÚ áéíóú Ññ Üü",
    "ñ",
    "¿Dónde está la secretaría del colegio?",
    "¿¿Qué?? ¡¡No!! ¿¡En serio!?",
    "El curso 2024-2025 empieza el 9 de septiembre.",
    "La nota media es 7,85 y el libro cuesta 12.50 €.",
    "3.141592653589793 y 1.000.000 de euros",
    "100 % de asistencia; 0,5 puntos; 3/4 de la clase; 2^10 = 1024",
    "Teléfono: +34 912 345 678, extensión 205",
    "Código IBAN: ES12 3456 7890 1234 5678 9012",
    "1º de Bachillerato, 2.º de ESO, 3ª evaluación, nº 7",
    "Horario: 8:30–14:30 (lunes a viernes)",
    "Escribe a secretaria@colegio.es o visita https://www.colegio.es/matricula?curso=1ESO&grupo=B",
    "www.educacion.gob.es/becas/convocatoria-2025.html",
    "¡Me encanta el comedor 😋🍝 y el recreo ⚽️!",
    "Familia 👨‍👩‍👧‍👦, pulgar 👍🏽 y bandera 🇪🇸",
    "muchos     espacios  entre   palabras",
    "  espacios al principio y al final  ",
    "                                   treinta y cinco espacios",
    "primera línea\nsegunda línea\n\ntercera",
    "niño\r\nniña",
    "columna1\tcolumna2\t\tcolumna3",
    "    indentado con cuatro espacios\n\tcon tabulador",
    "MAYÚSCULAS Y minúsculas MeZcLaDaS",
    "«Comillas latinas», “comillas inglesas” y 'simples' — raya y guion-corto",
    "Matemáticas: π ≈ 3,14159; √2 ≈ 1,414; x² + y² = r²",
    "En catalán: «Bon dia, com estàs?»; en francés: «Ça va?»",
    "El kanji 学校 significa «escuela».",
    "Texto con\u00a0espacio duro",
    "<start_of_turn>user\n¿A qué hora abre el comedor?<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>model\nEl comedor abre a las 13:30.<end_of_turn>",
    "<start_of_turn>user\nHola<end_of_turn>\n<start_of_turn>model\n¡Hola! ¿En qué puedo"
    " ayudarte?<end_of_turn>\n",
]

# Next-token prompts (each evaluated as BOS + text from an empty cache).
PROMPTS = [
    "La capital de España es",
    "El colegio abre sus puertas a las",
    "Para matricular a su hijo, debe presentar el",
    "Los alumnos de primaria comen en el",
    "Uno, dos, tres, cuatro,",
    "lunes, martes, miércoles,",
    "Enero, febrero, marzo,",
    "El agua hierve a cien grados",
    "¿Cuál es tu nombre? Mi nombre es",
    "Querida familia: les escribimos para informarles de que",
    "En verano, los niños van a la",
    "El profesor de matemáticas explicó la",
    "La biblioteca del centro está abierta de lunes a",
    "Había una vez un",
    "El español es una lengua que se habla en",
    "Buenos días, ¿en qué puedo",
    "El cielo es de color",
    "Dos más dos son",
    "La reunión de padres será el próximo",
    "Muchas gracias por su",
    "El horario de secretaría es de 9:00 a",
    "Don Quijote de la",
    "Cien años de",
    "A quien madruga, Dios le",
    "Las vacaciones de Navidad empiezan el 22 de",
    "Atentamente, la",
    "<start_of_turn>user\n¿Qué día empieza el curso?<end_of_turn>\n<start_of_turn>model\n",
    "El comedor escolar cuesta 5,50 € al",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Record llama.cpp's tokens, next-token logits and perplexity on the "
        "embedded Gemma 3 270M GGUF, as golden data for tests/test_gguf_convert.py.",
    )
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the embedded model)")
    parser.add_argument("--out", type=Path, help=f"JSON to write (default: {DEFAULT_OUT.name})")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help=f"run llama.cpp on a float32 copy of the GGUF (default out: {DEQUANTIZED_OUT.name})",
    )
    args = parser.parse_args(argv)
    args.out = args.out or (DEQUANTIZED_OUT if args.dequantize else DEFAULT_OUT)
    return args


def dequantized_copy(source: Path, target: Path) -> Path:
    """``source`` with every tensor dequantized to float32 (same metadata, same names)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def to_json(value, indent: str = "") -> str:
    """JSON with one line per string or prompt entry: readable in a diff, not 10k lines long."""
    if isinstance(value, dict) and any(isinstance(v, dict | list) for v in value.values()):
        inner = indent + " "
        items = [f"{inner}{json.dumps(k)}: {to_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}" + ("" if indent else "\n")
    if isinstance(value, list) and value and isinstance(value[0], dict):
        inner = indent + " "
        items = [inner + json.dumps(v, ensure_ascii=False) for v in value]
        return "[\n" + ",\n".join(items) + f"\n{indent}]"
    return json.dumps(value, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import llama_cpp

    if args.gguf is None:
        from gemma_cse.models import embedded_gguf

        args.gguf = embedded_gguf()
    model_path, options = args.gguf, {}
    if args.dequantize:
        scratch = tempfile.TemporaryDirectory()
        model_path = dequantized_copy(args.gguf, Path(scratch.name) / "model-f32.gguf")
        f32 = int(llama_cpp.GGML_TYPE_F32)
        options = {"type_k": f32, "type_v": f32}
    llm = llama_cpp.Llama(
        model_path=str(model_path),
        logits_all=True,
        n_ctx=512,
        n_threads=args.threads,
        verbose=False,
        **options,
    )
    bos = llm.token_bos()

    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def eval_logits(ids: list[int]) -> np.ndarray:
        """Logits after each of ``ids``, from an empty cache (no reused prefix)."""
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    start = time.perf_counter()
    strings = [{"text": text, "ids": tokenize(text)} for text in STRINGS]

    prompts = []
    for text in PROMPTS:
        ids = [bos, *tokenize(text)]
        last = eval_logits(ids)[-1]
        top = np.argsort(-last, kind="stable")[:5]
        prompts.append(
            {
                "text": text,
                "ids": ids,
                "top5_ids": [int(i) for i in top],
                "top5_pieces": [llm.detokenize([int(i)]).decode("utf-8", "replace") for i in top],
                "top5_logits": [round(float(last[i]), 4) for i in top],
            }
        )

    paragraph = PARAGRAPH.read_text(encoding="utf-8").strip()
    ids = [bos, *tokenize(paragraph)]
    if len(ids) > llm.n_ctx():
        sys.exit(f"paragraph is {len(ids)} tokens, more than n_ctx {llm.n_ctx()}")
    logprobs = log_softmax(eval_logits(ids)[:-1])
    nll = -logprobs[np.arange(len(ids) - 1), ids[1:]]

    golden = {
        "about": "llama.cpp reference for the embedded GGUF; written by tools/make_golden.py",
        "llama_cpp_python": llama_cpp.__version__,
        "gguf": args.gguf.name,
        "weights": "dequantized to float32, KV cache float32" if args.dequantize else "as stored",
        "gguf_bytes": args.gguf.stat().st_size,
        "bos_id": bos,
        "strings": strings,
        "prompts": prompts,
        "perplexity": {
            "file": PARAGRAPH.name,
            "ids": ids,
            "mean_nll": round(float(nll.mean()), 6),
            "perplexity": round(float(np.exp(nll.mean())), 6),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(golden), encoding="utf-8")
    print(
        f"wrote {args.out}: {len(strings)} strings, {len(prompts)} prompts, "
        f"perplexity {golden['perplexity']['perplexity']:.3f} over {len(ids) - 1} tokens "
        f"({time.perf_counter() - start:.1f} s, llama-cpp-python {llama_cpp.__version__})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
