"""The one place mcp-fhir adapts the MCP SDK (`mcp.server.mcpserver.MCPServer`) to its call path.

Hand-written because the SDK has no hook for what we need; every override of an SDK method
is in this module, and nothing else in mcp-fhir reaches into the SDK's private attributes.

* `register(server, tool)` publishes a declared `Tool` through the public `add_tool`: a
  generated entry function whose signature is the tool's parameter model, so the SDK derives
  the same input and output schemas it would from a hand-written function.
* `tools/call` is dispatched to `CallPath.run` with the raw arguments: the call path validates
  them (step 2) and audits every refusal, so a bad argument is audited under the request's id.
* `tools/list` shows only what the policy's `visible_tools` allows the caller, with
  `additionalProperties: false` and the policy's purposes as the `purpose` enum.
* Every error leaves in one of three shapes: a denial or a bad argument is a tool error
  (`isError`, JSON text with the stable `code`, reasons and decision id); an infrastructure
  failure is an MCP error whose `data` carries the code; an unknown tool or prompt is
  JSON-RPC -32602. No PHI, stack trace or secret is in any of them.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast, get_type_hints

from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS, CallToolResult, ListToolsResult, TextContent
from mcp.types import Tool as MCPTool
from pydantic import ValidationError

from mcp_fhir._exceptions import (
    AuditUnavailable,
    InvalidArgument,
    MCPFhirError,
    UnknownPatient,
    UpstreamAuthError,
    UpstreamBadResponse,
    UpstreamUnavailable,
)
from mcp_fhir.context import AppContext, Purpose
from mcp_fhir.tools.callpath import (
    UNKNOWN_TOOL,
    CallPath,
    current_subject,
    invalid_from_validation,
    visible_tools,
)
from mcp_fhir.tools.declare import Tool

log = logging.getLogger("mcp_fhir.server")

# JSON-RPC server-error codes; the stable string code is always in `data.code`.
INFRA_ERROR = -32050
DENIED_ERROR = -32051  # a denial on a surface that has no tool-error shape (resources)
INFRA_ERRORS: tuple[type[MCPFhirError], ...] = (
    AuditUnavailable,
    UpstreamUnavailable,
    UpstreamAuthError,
    UpstreamBadResponse,
)


def tool_error(exc: MCPFhirError) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(exc.to_dict()))], is_error=True)


def mcp_error(exc: MCPFhirError) -> MCPError:
    """The MCP error for `exc` on a surface without tool errors (resources, prompts)."""
    if isinstance(exc, INFRA_ERRORS):
        code = INFRA_ERROR
    elif isinstance(exc, InvalidArgument | UnknownPatient):
        code = INVALID_PARAMS
    else:
        code = DENIED_ERROR
    return MCPError(code, str(exc), exc.to_dict())


def app_of(ctx: Context) -> AppContext:
    """The lifespan's `AppContext` from the SDK's per-request context."""
    return cast(AppContext, ctx.request_context.lifespan_context)


def _entry(tool: Tool) -> Callable[..., Awaitable[CallToolResult]]:
    """A function whose signature is `tool`'s parameters (plus the SDK's Context), for `add_tool`."""

    async def entry(ctx: Context, **arguments: Any) -> CallToolResult:
        # Publication only: calls go through `_handle_call_tool`, which also returns an InputRequiredResult.
        return cast(CallToolResult, await CallPath(app_of(ctx)).run(tool, arguments, ctx=ctx))

    hints = get_type_hints(tool.args, include_extras=True)
    params = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=hints[name],
            default=inspect.Parameter.empty if info.is_required() else info.default,
        )
        for name, info in tool.args.model_fields.items()
    ]
    params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context))
    entry.__signature__ = inspect.Signature(params, return_annotation=tool.result)  # type: ignore[attr-defined]
    entry.__annotations__ = {**{p.name: p.annotation for p in params}, "return": tool.result}
    entry.__name__ = entry.__qualname__ = tool.name
    entry.__doc__ = tool.description
    return entry


def _purpose_schema(prop: dict[str, Any], purposes: tuple[Purpose, ...]) -> dict[str, Any]:
    """The `purpose` property with the policy's purposes as its enum, each described."""
    names = [p.name for p in purposes]
    described = "; ".join(f"{p.name}: {p.description}" for p in purposes)
    out = dict(prop)
    if "anyOf" in out:
        out["anyOf"] = [
            {**branch, "enum": names} if branch.get("type") == "string" else branch for branch in out["anyOf"]
        ]
    else:
        out["enum"] = names
    out["description"] = f"{prop.get('description', '')} One of (from the policy): {described}.".strip()
    return out


def published(tool: MCPTool, purposes: tuple[Purpose, ...]) -> MCPTool:
    """A tool as it is listed: unknown arguments refused, the policy's purposes as an enum."""
    schema = dict(tool.input_schema)
    schema["additionalProperties"] = False
    props = dict(schema.get("properties") or {})
    if purposes and "purpose" in props:
        props["purpose"] = _purpose_schema(props["purpose"], purposes)
    schema["properties"] = props
    return tool.model_copy(update={"input_schema": schema})


class SidecarServer(MCPServer[AppContext]):
    """`MCPServer` whose tools are declarations run by `CallPath`, listed under policy."""

    # The running app (set by the lifespan) and the hook that audits HTTP authentication rejections.
    app_holder: dict[str, AppContext]
    on_reject: Callable[[str, str | None], Awaitable[None]] | None
    # Operator handles (`token_verifier`, `managed_opa`) for SIGHUP reloads and build info.
    ops: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.declared: dict[str, Tool] = {}
        self.app_holder = {}
        self.on_reject = None
        self.ops = {}

    def declare(self, tool: Tool) -> None:
        """Publish a declared tool."""
        self.declared[tool.name] = tool
        self.add_tool(
            _entry(tool),
            name=tool.name,
            description=tool.description,
            annotations=tool.annotations,
            structured_output=True,
        )

    async def run_streams(self, read_stream: Any, write_stream: Any) -> None:
        """Serve one session on the given streams: `run_stdio_async`, but on streams the caller made
        (`cli/stdio.py` gives the SDK its own stdin reader). The SDK has no public door for this, so this
        adapter is the one place that names its low-level server."""
        lowlevel = self._lowlevel_server
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())

    def withdraw(self, name: str) -> None:
        """Stop offering a tool (not enabled in the configuration)."""
        self.declared.pop(name, None)
        self.remove_tool(name)

    async def _handle_list_tools(self, ctx: Any, params: Any) -> ListToolsResult:
        app: AppContext = ctx.lifespan_context
        try:
            subject = current_subject(app)
        except MCPFhirError:
            return ListToolsResult(tools=[])
        visible = await visible_tools(app, subject)
        return ListToolsResult(
            tools=[published(t, app.purposes) for t in await self.list_tools() if t.name in visible]
        )

    async def _handle_call_tool(self, ctx: Any, params: Any) -> Any:
        app: AppContext = ctx.lifespan_context
        tool = self.declared.get(params.name)
        if tool is None:
            err = InvalidArgument("name", "is not a tool of this server")
            await self._refuse(app, UNKNOWN_TOOL, err)
            raise MCPError(INVALID_PARAMS, str(err), err.to_dict())  # the spec's protocol error
        context = Context(
            request_context=ctx, mcp_server=self, input_params=params, subscriptions=self._subscriptions
        )
        try:
            return await CallPath(app).run(tool, params.arguments or {}, ctx=context)
        except MCPFhirError as exc:  # audited by the call path
            if isinstance(exc, INFRA_ERRORS):
                raise MCPError(INFRA_ERROR, str(exc), exc.to_dict()) from None
            return tool_error(exc)

    async def _handle_get_prompt(self, ctx: Any, params: Any) -> Any:
        """An unknown prompt or a bad prompt argument is JSON-RPC -32602, never the SDK's code 0."""
        if params.name not in {p.name for p in await self.list_prompts()}:
            err = InvalidArgument("name", "is not a prompt of this server")
            raise MCPError(INVALID_PARAMS, str(err), err.to_dict())
        try:
            return await super()._handle_get_prompt(ctx, params)
        except MCPError:
            raise
        except Exception as exc:  # the SDK wraps argument errors in a bare ValueError
            root = _root(exc)
            err = root if isinstance(root, InvalidArgument) else InvalidArgument("arguments", "are not valid")
            raise MCPError(INVALID_PARAMS, str(err), err.to_dict()) from None

    async def _refuse(self, app: AppContext, tool: str, exc: MCPFhirError) -> None:
        try:
            subject = current_subject(app)
        except MCPFhirError:
            subject = None
        try:
            await CallPath(app).refuse(tool, exc, subject=subject)
        except AuditUnavailable:
            raise MCPError(
                INFRA_ERROR, str(AuditUnavailable("audit unavailable")), {"code": AuditUnavailable.code}
            ) from None


def _root(exc: BaseException) -> BaseException:
    """The deepest cause that is ours, walking `raise ... from`."""
    seen: BaseException | None = exc
    found: BaseException = exc
    while seen is not None:
        if isinstance(seen, MCPFhirError):
            found = seen
        elif isinstance(seen, ValidationError):
            found = invalid_from_validation(seen)
        seen = seen.__cause__
    return found
