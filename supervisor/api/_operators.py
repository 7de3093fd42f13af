"""The operators' endpoints: the human queue, approvals, and the kill switches. Each needs an
operator's API key; each is a request to the supervisor's operators' desk, which decides
it and puts it in the audit chain with the key's client as the operator."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from corral.bus import (
    ApprovalsQuery,
    ApprovalsView,
    ApprovalVerdict,
    OperatorAction,
    OperatorRequest,
    QueueQuery,
    QueueView,
    SwitchRequest,
    subjects,
)
from corral.supervisor.api import _models as m
from corral.supervisor.api._base import ApiBase
from corral.supervisor.api._openapi import Endpoint
from corral.supervisor.api._problems import ApiProblem


def verdict_endpoints(
    path: str,
    handler: Callable[[bool], Callable[[Request], Awaitable[Response]]],
    what: str,
    *,
    operator: bool,
) -> list[Endpoint]:
    """``path``/approve and ``path``/deny, deciding ``what`` (an operator's, or the
    customer's: a customer's may be refused with 409 too)."""
    return [
        Endpoint(
            "POST",
            f"{path}/{verb}",
            handler(approve),
            f"{verb.capitalize()} {what}",
            m.VerdictRequest,
            m.VerdictDone,
            200,
            operator=operator,
            conflicts=not operator,
        )
        for verb, approve in (("approve", True), ("deny", False))
    ]


class OperatorEndpoints(ApiBase):
    """The operators' endpoints (see the module)."""

    async def queue(self, request: Request) -> Response:
        await self._key(request, operator=True)
        view = await self._ask(QueueQuery(limit=100), QueueView)
        return JSONResponse(m.Queue.model_validate({"items": view.items}).model_dump())

    def _operator_action(self, action: OperatorAction) -> Callable[[Request], Awaitable[Response]]:
        async def act(request: Request) -> Response:
            key = await self._key(request, operator=True)
            conversation = request.path_params["conversation"]
            body = await self._body(request, m.OperatorActionRequest)
            if not subjects.is_id(conversation):
                raise ApiProblem(404, f"no conversation {conversation!r}")
            asked = OperatorRequest(
                action=action,
                conversation=conversation,
                by=key.client,
                id=f"o-{uuid.uuid4().hex[:20]}",
                text=body.text,
                agent=body.agent,
                note=body.note,
            )
            answer = await self._to_desk(asked, missing="no conversation")
            done = m.OperatorActionDone(
                conversation=conversation,
                action=action,
                claimed_by=answer.claimed_by or None,
                claim_expires_at=answer.claim_expires_at or None,
            )
            return JSONResponse(done.model_dump())

        return act

    async def approvals(self, request: Request) -> Response:
        await self._key(request, operator=True)
        view = await self._ask(ApprovalsQuery(), ApprovalsView)
        return JSONResponse(m.Approvals.model_validate({"items": view.items}).model_dump(mode="json"))

    def _verdict(self, approve: bool) -> Callable[[Request], Awaitable[Response]]:
        async def decide(request: Request) -> Response:
            key = await self._key(request, operator=True)
            approval = request.path_params["approval"]
            body = await self._body(request, m.VerdictRequest)
            if not subjects.is_id(approval):
                raise ApiProblem(404, f"no approval {approval!r}")
            verdict = ApprovalVerdict(
                approval_id=approval, approve=approve, by=key.client, reason=body.reason
            )
            await self._to_desk(verdict, missing="no approval")
            done = m.VerdictDone(approval=approval, status="approved" if approve else "denied")
            return JSONResponse(done.model_dump())

        return decide

    def _switch(
        self, target: Literal["agent", "conversation"], revive: bool
    ) -> Callable[[Request], Awaitable[Response]]:
        async def flip(request: Request) -> Response:
            key = await self._key(request, operator=True)
            name = request.path_params[target]
            body = await self._body(request, m.SwitchBody)
            asked = SwitchRequest(target=target, name=name, by=key.client, reason=body.reason, revive=revive)
            answer = await self._to_desk(asked, missing="no ")
            done = m.SwitchDone(
                target=target,
                name=name,
                status="killed" if not revive else "not killed" if answer.reason else "revived",
            )
            return JSONResponse(done.model_dump())

        return flip

    def _switch_endpoints(self) -> list[Endpoint]:
        """Kill and revive an agent, kill a conversation (as `corral kill` and `corral revive`)."""
        return [
            Endpoint(
                "POST",
                path,
                self._switch(target, revive),  # type: ignore[arg-type]
                summary,
                m.SwitchBody,
                m.SwitchDone,
                200,
                operator=True,
            )
            for path, target, revive, summary in (
                ("/v1/agents/{agent}/kill", "agent", False, "Kill an agent"),
                ("/v1/agents/{agent}/revive", "agent", True, "Revive a killed agent"),
                ("/v1/conversations/{conversation}/kill", "conversation", False, "Kill a conversation"),
            )
        ]

    def _operator_endpoints(self) -> list[Endpoint]:
        """The queue, the approvals and the kill switches: an operator's key only."""
        queue = "/v1/queue/{conversation}"
        endpoints = [
            Endpoint("GET", "/v1/queue", self.queue, "The human queue", None, m.Queue, 200, operator=True),
        ]
        endpoints.append(
            Endpoint(
                "GET",
                "/v1/approvals",
                self.approvals,
                "Pending approvals",
                None,
                m.Approvals,
                200,
                operator=True,
            )
        )
        endpoints += verdict_endpoints(
            "/v1/approvals/{approval}", self._verdict, "a pending approval", operator=True
        )
        for action, summary in (
            ("claim", "Claim an escalated conversation"),
            ("reply", "Answer its customer as a human"),
            ("handback", "Hand it back to an agent"),
            ("close", "Close it"),
        ):
            endpoints.append(
                Endpoint(
                    "POST",
                    f"{queue}/{action}",
                    self._operator_action(action),  # type: ignore[arg-type]
                    summary,
                    m.OperatorActionRequest,
                    m.OperatorActionDone,
                    200,
                    operator=True,
                )
            )
        return [*endpoints, *self._switch_endpoints()]
