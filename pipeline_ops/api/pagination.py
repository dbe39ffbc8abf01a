"""Cursor pagination: stable pages while new inputs arrive (no offsets that shift under the reader)."""
from __future__ import annotations

from rest_framework.pagination import CursorPagination

from . import conf


class InputCursorPagination(CursorPagination):
    ordering = "-created_at"
    page_size_query_param = "page_size"

    def get_page_size(self, request):
        # Read per request (settings may change in tests); the client may ask for fewer or more, up to the cap.
        self.page_size = conf.get("PAGE_SIZE")
        self.max_page_size = conf.get("MAX_PAGE_SIZE")
        return super().get_page_size(request)
