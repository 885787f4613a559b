"""Dataset handlers: turn a batch of input rows into the document texts of each output key.

Names and behaviour follow MindSpeed-LLM's `--handler-name` for pretraining data:
- `GeneralPretrainHandler` (the default): each `--json-keys` column is tokenized as it is, one
  output file pair per key.
- `AlpacaPretrainHandler`: one `text` document per row, built from instruction/input/output with
  MindSpeed's conversation template (byte for byte, including its quirks).
- `AlpacaStyleInstructionHandler`: one `text` document per row, the user turn (instruction, then
  input on a new line) and the assistant turn (output) rendered with the tokenizer's chat template.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from qwen3_pretrain.data.inputs import Batch, DataInputError

Texts = dict[str, list[str | None]]  # output key -> one text (None or "" = empty) per row

# MindSpeed's AlpacaPretrainHandler template; note the missing space after "questions." and that a
# row without input renders "###None" there: MindSpeed does exactly this, so the tokens match.
ALPACA_PRETRAIN_TEMPLATE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
    "USER: Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n###{inputs}\n\n### Response: ASSISTANT: {response}"
)
# MindSpeed's --map-keys roles for Alpaca data and their default columns.
ALPACA_DEFAULT_KEYS = {"prompt": "instruction", "query": "input", "response": "output"}


def _text(column: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DataInputError(
        f"column {column!r} holds a {type(value).__name__} value ({str(value)[:60]!r}), not text; "
        f"pass --json-keys with text columns"
    )


class GeneralPretrainHandler:
    """Tokenize each `--json-keys` column as it is."""

    def __init__(self, json_keys: list[str]) -> None:
        self.output_keys = list(json_keys)
        self.required = list(json_keys)
        self.optional: list[str] = []

    def texts(self, batch: Batch) -> Texts:
        return {key: [_text(key, v) for v in batch[key]] for key in self.output_keys}


class _AlpacaHandler(ABC):
    """Shared column handling of the Alpaca handlers: one `text` document per row."""

    def __init__(self, map_keys: dict[str, str] | None) -> None:
        unknown = set(map_keys or {}) - set(ALPACA_DEFAULT_KEYS)
        if unknown:
            raise DataInputError(
                f"--map-keys: unknown role(s) {sorted(unknown)}; Alpaca data uses {sorted(ALPACA_DEFAULT_KEYS)}"
            )
        keys = {**ALPACA_DEFAULT_KEYS, **(map_keys or {})}
        self.instruction, self.input, self.output = keys["prompt"], keys["query"], keys["response"]
        self.output_keys = ["text"]
        self.required = [self.instruction, self.output]
        self.optional = [self.input]

    def texts(self, batch: Batch) -> Texts:
        rows = zip(batch[self.instruction], batch[self.input], batch[self.output], strict=True)
        return {
            "text": [
                self.render(_text(self.instruction, a) or "", _text(self.input, b) or "", _text(self.output, c) or "")
                for a, b, c in rows
            ]
        }

    @abstractmethod
    def render(self, instruction: str, inputs: str, output: str) -> str:
        """The document text of one row."""


class AlpacaPretrainHandler(_AlpacaHandler):
    """MindSpeed's Alpaca pretraining text: a fixed conversation template around each row."""

    def render(self, instruction: str, inputs: str, output: str) -> str:
        return ALPACA_PRETRAIN_TEMPLATE.format(
            instruction=instruction, inputs=f" Input:\n{inputs}" if inputs else None, response=output
        )


class AlpacaStyleInstructionHandler(_AlpacaHandler):
    """A user/assistant conversation per row, rendered by the tokenizer's chat template."""

    def __init__(self, map_keys: dict[str, str] | None, tokenizer: Any) -> None:
        super().__init__(map_keys)
        if not getattr(tokenizer, "chat_template", None):
            raise DataInputError(
                "--handler-name AlpacaStyleInstructionHandler needs a tokenizer with a chat template "
                "(chat_template in tokenizer_config.json); use AlpacaPretrainHandler for plain text"
            )
        self.tokenizer = tokenizer

    def render(self, instruction: str, inputs: str, output: str) -> str:
        user = f"{instruction}\n{inputs}" if inputs else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)


HANDLERS = ("GeneralPretrainHandler", "AlpacaPretrainHandler", "AlpacaStyleInstructionHandler")


def build_handler(
    name: str, json_keys: list[str], map_keys: dict[str, str] | None, tokenizer: Any
) -> GeneralPretrainHandler | AlpacaPretrainHandler | AlpacaStyleInstructionHandler:
    """The handler called `name` (empty: GeneralPretrainHandler, as in MindSpeed)."""
    if name in ("", "GeneralPretrainHandler"):
        if map_keys:
            raise DataInputError(
                "--map-keys applies to the Alpaca handlers; "
                "with GeneralPretrainHandler name the columns with --json-keys"
            )
        return GeneralPretrainHandler(json_keys)
    if name == "AlpacaPretrainHandler":
        return AlpacaPretrainHandler(map_keys)
    if name == "AlpacaStyleInstructionHandler":
        return AlpacaStyleInstructionHandler(map_keys, tokenizer)
    raise DataInputError(f"--handler-name {name!r} is not supported; choose one of: {', '.join(HANDLERS)}")
