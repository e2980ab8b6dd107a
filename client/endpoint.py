"""The endpoint probe: one GET /v1/models before a command sends any work, so a wrong URL, key or model
name fails at once with what to check, not as a run of failed requests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openai import AsyncOpenAI


class EndpointError(RuntimeError):
    """The endpoint cannot take the run: unreachable, refuses the key, answers an error, or lacks a model."""


async def served_models(
    client: AsyncOpenAI, wanted: Sequence[str] = (), option: str = "--models"
) -> list[dict[str, Any]]:
    """The endpoint's model listing; EndpointError says what is wrong, naming `option` for any model in
    `wanted` it does not serve. Asked once, without retries: a probe that fails says so at once."""
    import openai

    url = f"{str(client.base_url).rstrip('/')}/models"
    try:
        page = await client.with_options(max_retries=0).models.list()
    except openai.APIConnectionError as error:
        raise EndpointError(
            f"cannot reach {url} ({error.__cause__ or error}); is the server running at --base-url?"
        ) from error
    except openai.AuthenticationError as error:
        raise EndpointError(
            f"{url} refused the API key (401); pass the server's key with --api-key"
        ) from error
    except openai.APIStatusError as error:
        raise EndpointError(f"GET {url} answered HTTP {error.status_code}: {error.message}") from error
    listing = [model.model_dump() for model in page.data]
    served = [str(model["id"]) for model in listing]
    missing = [name for name in wanted if name not in served]
    if missing:
        raise EndpointError(
            f"{option}: {', '.join(missing)} not served at {url}; it serves: {', '.join(served)}"
        )
    return listing
