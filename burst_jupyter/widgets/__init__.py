"""Widgets and text views: they render the JobEvent stream and budget snapshots, nothing else.

Importing this package does not import ipywidgets; each view imports it when its widget is first built.
"""

from burst_jupyter.widgets.budget_bars import BudgetBars, BudgetSnapshot, PeriodSnapshot
from burst_jupyter.widgets.job_view import JobView, JobViewState
from burst_jupyter.widgets.offer_browser import OfferBrowser
from burst_jupyter.widgets.offer_table import OfferFilter

__all__ = ["BudgetBars", "BudgetSnapshot", "JobView", "JobViewState", "OfferBrowser", "OfferFilter", "PeriodSnapshot"]
