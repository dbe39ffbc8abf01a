"""A project that has nothing to do with pipelines, using idempotency.drf on its own views
(tests/testapp's Receipt is its only model): the reusable half of the API."""
from __future__ import annotations

from datetime import timedelta

from django.urls import path
from django.utils import timezone
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from idempotency import guard
from idempotency.drf import IdempotencyMixin, idempotent_endpoint
from tests.testapp.models import Receipt


class ChargeSerializer(serializers.Serializer):
    amount = serializers.IntegerField(min_value=1)


class ChargeApi(IdempotencyMixin, APIView):
    def idempotency_claimed(self, request, attempt) -> None:
        # amount 77/78: while this request works, its lease "expires" and a newer attempt takes
        # the key over (78: and completes it first), so this request's completion is fenced.
        amount = request.data.get("amount")
        if amount in (77, 78):
            later = timezone.now() + timedelta(hours=1)
            newer = guard.claim(scope=attempt.record.scope, key=attempt.record.key, operation=attempt.record.operation,
                                fingerprint=attempt.record.fingerprint, now=later)
            assert isinstance(newer, guard.Claimed)
            if amount == 78:
                winner = {"status": 201, "body": '{"receipt":"the winner"}', "headers": {"Content-Type": "application/json"}}
                guard.complete(attempt=newer.attempt, result=winner, now=later)

    def post(self, request):
        data = ChargeSerializer(data=request.data)
        data.is_valid(raise_exception=True)

        def perform():
            receipt = Receipt.objects.create(key=request.headers["Idempotency-Key"], amount=data.validated_data["amount"], attempt_number=1)
            if data.validated_data["amount"] == 13:
                raise RuntimeError("unlucky amount: the charge fails after writing")
            if data.validated_data["amount"] == 404:
                return Response({"detail": "refused"}, status=404)
            return Response({"receipt": receipt.pk, "amount": receipt.amount}, status=201, headers={"Location": f"/receipts/{receipt.pk}"})

        return self.idempotent_response(request, perform=perform)


class RefundApi(APIView):
    @idempotent_endpoint()
    def post(self, request):
        receipt = Receipt.objects.create(key=f"refund:{request.headers['Idempotency-Key']}", amount=-int(request.data["amount"]), attempt_number=1)
        return Response({"refund": receipt.pk}, status=201)


urlpatterns = [
    path("charges/", ChargeApi.as_view()),
    path("refunds/", RefundApi.as_view()),
]
