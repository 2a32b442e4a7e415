"""What the OpenAPI page (``/docs``, ``/openapi.json``) says about bodies FastAPI cannot see.

The routes read their bodies themselves (a safetensors message, or bounded JSON), so FastAPI infers no
request schema; these ``openapi_extra`` entries describe each body and its answers. docs/http-api.md is
the full reference.

Example:
    >>> @router.post("/v1/forward", openapi_extra=FORWARD_DOC)
"""

from __future__ import annotations

from typing import Any

__all__ = ["CLASSIFY_DOC", "EMBED_DOC", "FORWARD_DOC", "GENERATE_DOC", "RELEASE_DOC", "TOKENIZE_DOC", "VJP_DOC"]
WIRE = "application/vnd.graytune.safetensors"
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_TEXTS = {"type": "array", "items": {"type": "string"}, "example": ["a cat", "a dog"]}
_ERRORS = {
    "400": {"description": "malformed or refused input: {\"error\", \"detail\"} saying what was received and "
                           "what is allowed"},
    "401": {"description": "no valid API key (send Authorization: Bearer KEY)"},
    "403": {"description": "above this server's level or grants: {\"error\": \"access_denied\", \"detail\", "
                           "\"needed\", \"granted\"}; the detail names the methods this level allows; "
                           "duplicate_rows or black_box_edits where the owner refuses them"},
    "413": {"description": "past a limit (body size, strings, token positions, pixels, JSON values); the detail "
                           "names the flag"},
    "429": {"description": "the client's quota (--quota-samples, --quota-grad-rows, --quota-tokens) is used up"},
    "503": {"description": "busy: the queue or the in-flight memory is full (Retry-After)"},
    "504": {"description": "the work ran past --request-timeout-s and was stopped"},
}


def _body(description: str, json_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {WIRE: _BINARY}
    if json_schema is not None:
        content = {"application/json": {"schema": json_schema}, **content}
    return {"requestBody": {"required": True, "description": description, "content": content},
            "responses": _ERRORS}


FORWARD_DOC = _body(
    "A graytune safetensors message (graytune.access.wire.pack_call): tensors inputs/<port> (e.g. "
    "inputs/text.input_ids [B, L] int64, inputs/image.pixels [B, 3, H, W] float32), add/<port> and "
    "insert/<port>; metadata access, outputs, reads, grad (names of the tensors that want gradients), "
    "optionally texts, request (a key per forward) and top_k (a language model's k most likely next tokens, "
    "within the owner's --grant-topk). Answer: out/<port> per output, read/<port> per read (read/text.top_ids "
    "and read/text.top_logprobs [B, L, k] with top_k), metadata session (when gradients are wanted).")
VJP_DOC = _body(
    "A graytune safetensors message: grad/<port> per output and metadata session; or, after a 410, the whole "
    "forward again with recompute: true. Answer: <group>/<port> per client tensor that wanted a gradient.")
GENERATE_DOC = _body(
    "A graytune safetensors message: a forward's inputs/<port> (or texts), add/<port> and insert/<port>, token maps "
    "maps/text.token_embeds/down [r, D] and maps/text.token_embeds/up [D, r]; metadata settings {max_new_tokens, "
    "temperature, top_p, seed, stop_at_eos} and stream. Answer: ids [B, N] and lengths [B] (int64) with texts in "
    "the metadata; with stream: true, application/x-ndjson lines {\"texts\": [...]} per token, then {\"ids\", "
    "\"lengths\", \"texts\"} or {\"error\", \"detail\", \"status\"}. Charged one sample per row and tokens "
    "(--quota-tokens): the prompt's, and those generated.")
GENERATE_IMAGES_DOC = _body(
    "A graytune safetensors message: a forward's inputs/<port> (or texts), add/<port> and insert/<port>, applied to "
    "the prompts' encoding; metadata settings {num_inference_steps, guidance_scale, seed, height, width, "
    "negative_prompt}. Answer: images [B, 3, H, W] float32 in [0, 1], and nothing else (no latents, no gradient). "
    "Bounded by --max-pixels and --max-denoising-work; charged one sample per row and the prompts' tokens.")
TOKENIZE_DOC = _body("JSON {\"texts\": [...]}; answer: a safetensors message of text.input_ids and "
                     "text.attention_mask [B, L] int64.",
                     {"type": "object", "properties": {"texts": _TEXTS}, "required": ["texts"]})
RELEASE_DOC = _body("JSON {\"session\": id}: release a session that will not be differentiated.",
                    {"type": "object", "properties": {"session": {"type": "string"}}, "required": ["session"]})
EMBED_DOC = _body(
    "JSON {\"texts\": [...]} (answered as JSON {\"embeds\": [[...]]}), or a graytune safetensors message with "
    "inputs/image.pixels [B, 3, H, W] float32 or texts in its metadata (answered as a message with embeds [B, E]).",
    {"type": "object", "properties": {"texts": _TEXTS}, "required": ["texts"]})
CLASSIFY_DOC = _body(
    "JSON {\"texts\": [...], \"classes\": [...], \"template\": \"a photo of a {}.\"} (answered as JSON "
    "{\"logits\": [[...]], \"classes\": [...]}), or a graytune safetensors message with inputs/image.pixels and "
    "classes (and template) in its metadata. Charged one sample per row and one per class.",
    {"type": "object", "properties": {"texts": _TEXTS, "classes": _TEXTS, "template": {"type": "string"}},
     "required": ["classes"]})
