"""The operations console (Django admin): pages, safe actions, the attempt timeline, the dashboard."""
from . import pages  # noqa: F401  (registers the ModelAdmins)
