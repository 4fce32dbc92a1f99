"""``RequestModel``: the base of request bodies, with OpenAI's rule that an explicit
``null`` means the same as leaving the field out.

The ``openai`` SDK sends ``null`` for every argument a caller passes as ``None``
(``temperature=None``, ``n=None``...), and OpenAI answers with the field's default; a
strict reading of a field typed ``float`` would make each of those a 422. A field whose
default is not ``None`` therefore drops a ``null`` before validation and gets its default;
required fields (``model``, ``messages``) still refuse it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RequestModel(BaseModel):
    """A request body (unknown fields ignored): ``null`` is the field's default."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None
            or key not in fields
            or fields[key].is_required()
            or fields[key].get_default(call_default_factory=True) is None
        }


class ForeignConstraintFields(RequestModel):
    """Other servers' structured-output fields (llama-server's, vLLM's) on a route that
    does not take them: declared so that a request carrying one is a 400 naming it
    (:meth:`foreign_constraint`), never text that silently ignores what it asked."""

    json_schema: Any = Field(None, description="llama-server's: not taken here (a 400).")
    grammar: Any = Field(None, description="llama-server's GBNF: not taken here (a 400).")
    guided_json: Any = Field(None, description="vLLM's: not taken here (a 400).")
    guided_regex: Any = Field(None, description="vLLM's: not taken here (a 400).")
    guided_choice: Any = Field(None, description="vLLM's: not taken here (a 400).")
    guided_grammar: Any = Field(None, description="vLLM's: not taken here (a 400).")

    def foreign_constraint(self, *more: str) -> str | None:
        """The first of these fields (and ``more``) the request set; ``""`` is unset, as
        llama.cpp reads an empty grammar."""
        names = (*ForeignConstraintFields.model_fields, *more)
        return next((n for n in names if getattr(self, n) not in (None, "")), None)
