"""Azure OpenAI: OpenAI's wire format at deployment URLs, with its own key header.

``{base_url}/openai/deployments/{deployment}/{endpoint}?api-version=...``, where the
deployment is the provider's model (configured, or the client's), and the key goes in
``api-key``. Bodies and streams are OpenAI's, so answers pass untouched (the relay's fast
path). Errors keep their shape; a content-filter refusal (``content_filter``,
``ResponsibleAIPolicyViolation``) is ``content_refused`` and a missing deployment
(``DeploymentNotFound``) ``model_missing``. The probe lists ``/openai/models``, the models
the resource offers; deployment names are not in it, so it never decides
``model_missing``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

import orjson

from gateway.providers.base import Outgoing, Translator, api_root
from gateway.providers.openai import OpenAIDialect

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.config import ProviderConfig

#: The API version sent when the provider's ``api_version`` is not set (GA, 2024-10-21).
VERSION = "2024-10-21"
# Azure's error codes, as the OpenAI codes that classify them.
_CODES = {
    "deploymentnotfound": "model_not_found",
    "responsibleaipolicyviolation": "content_filter",
}


class AzureErrors(Translator):
    """The identity for answers and streams; Azure's error codes in OpenAI's terms."""

    __slots__ = ()

    def error(self, status: int, body: bytes) -> bytes:
        """``DeploymentNotFound`` -> ``model_not_found``; a content-filter refusal whose
        code sits only in ``innererror`` -> ``content_filter``."""
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        err = parsed.get("error") if isinstance(parsed, dict) else None
        if not isinstance(err, dict):
            return body
        inner = err.get("innererror")
        codes = [err.get("code"), inner.get("code") if isinstance(inner, dict) else None]
        for code in codes:
            mapped = _CODES.get(str(code).lower())
            if mapped is not None:
                return orjson.dumps({"error": {**err, "code": mapped}})
        return body


_ERRORS = AzureErrors()


class AzureDialect(OpenAIDialect):
    """Azure OpenAI deployments; the OpenAI dialect's compatibility options apply too."""

    base_path = ""  # what a configured base URL is made to end in
    judges_models = False

    def __init__(self, config: ProviderConfig, max_event_bytes: int) -> None:
        super().__init__(config, max_event_bytes)
        root = api_root(config.base_url).removesuffix("/openai")  # either way round
        version = quote(config.api_version or VERSION, safe="")
        self._deployments = f"{root}/openai/deployments/"
        self._query = f"?api-version={version}"
        self.models_url = f"{root}/openai/models{self._query}"

    def headers(self, api_key: str | None) -> dict[str, str]:
        """The key in ``api-key``, as Azure wants it."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["api-key"] = api_key
        return headers

    def request(self, call: Call, model: str) -> Outgoing:
        """The deployment named ``model`` gets the client's body (its ``model`` field is
        not read by Azure, so the bytes stay untouched)."""
        url = f"{self._deployments}{quote(model, safe='')}/{call.endpoint}{self._query}"
        body = self._body(call, call.model)
        return url, body, self._answers(call, _ERRORS)
