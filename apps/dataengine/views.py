"""The console's data-engine page: the triggers rules fired, each with the evidence that made it fire and what became
of its training task. Read-only; rules change through the API."""

from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse

from apps.console.access import console_page, render_page
from apps.dataengine.models import DataEngineRule, DataEngineTrigger

PAGE_SIZE = 25


@console_page()
def trigger_list(request: HttpRequest) -> HttpResponse:
    triggers = DataEngineTrigger.objects.select_related("rule", "training_task")
    domain = request.GET.get("domain", "").strip()[:100]
    if domain:
        triggers = triggers.filter(domain=domain)
    page = Paginator(triggers, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render_page(
        request,
        "dataengine/trigger_list.html",
        {
            "page": page,
            "query": query.urlencode(),
            "domain": domain,
            "rules": DataEngineRule.objects.all(),
        },
        nav="data-engine",
    )
