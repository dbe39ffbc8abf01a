"""The REST API (Django REST framework) under /api/v1/: idempotent submissions, reads, operator actions.

The idempotency part is the reusable ``idempotency.drf``; this package only applies it.
"""
