"""The control plane's HTTP routes: feedback on answers, domain thresholds, human review of held
answers. Each is one typed call to the records actor (services/control/client.py), whose errors are
already OpenAI-shaped (404, 409, 400; 503 when the actor is restarting)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.control.client import RecordsClient
from services.ingress import responses
from services.ingress.api import ApiError, FeedbackRequest, ReviewDecision

REVIEW_STATUSES = ("pending", "approved", "rejected")

routes = APIRouter()


def records(request: Request) -> RecordsClient:
    return request.app.state.records  # set by the Router replica at start


@routes.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request) -> JSONResponse:
    """Was a completion's answer correct? Updates its domain's statistics (and threshold), and tells
    depth control whether the rounds that changed its answer made it right (the depth value)."""
    result = await records(request).feedback(body.request_id, body.correct)  # refuses unknown ids, repeats
    request.app.state.depth.feedback(body.request_id, body.correct)
    return JSONResponse(result)


@routes.get("/v1/domains")
async def list_domains(request: Request) -> JSONResponse:
    """Every domain's live threshold, calibration and feedback (records), and per tier what its later
    rounds were worth and the ceiling that comes to (depth control; null when unreachable)."""
    body = await records(request).domains()
    depth = await request.app.state.depth.depth_report()
    for name, d in body.get("domains", {}).items():
        d["depth_value"] = None if depth is None else depth.get(name, {})
    return JSONResponse(body)


@routes.get("/v1/reviews")
async def list_reviews(request: Request, status: str | None = None, limit: int = 100) -> JSONResponse:
    if status is not None and status not in REVIEW_STATUSES:
        raise ApiError(400, f"status must be one of {', '.join(REVIEW_STATUSES)}", param="status")
    if not 1 <= limit <= 1000:
        raise ApiError(400, f"limit must be between 1 and 1000; got {limit}", param="limit")
    rows = await records(request).list_reviews(status, limit)
    return JSONResponse({"object": "list", "data": [responses.review_view(r) for r in rows]})


@routes.get("/v1/reviews/{review_id}")
async def get_review(review_id: str, request: Request) -> JSONResponse:
    row = await records(request).get_review(review_id)
    if row is None:
        raise ApiError(404, f"no review {review_id!r}", param="review_id", code="not_found")
    return JSONResponse(responses.review_view(row))


@routes.post("/v1/reviews/{review_id}/approve")
async def approve(review_id: str, request: Request, body: ReviewDecision | None = None) -> JSONResponse:
    return await _decide(request, review_id, True, body)


@routes.post("/v1/reviews/{review_id}/reject")
async def reject(review_id: str, request: Request, body: ReviewDecision | None = None) -> JSONResponse:
    return await _decide(request, review_id, False, body)


async def _decide(
    request: Request, review_id: str, approve: bool, body: ReviewDecision | None
) -> JSONResponse:
    body = body or ReviewDecision()
    row = await records(request).decide_review(review_id, approve, body.reviewer, body.note)
    return JSONResponse(responses.review_view(row))
