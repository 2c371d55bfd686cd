"""Forms of the console: an officer's decision on an approval request, and the list filters."""

from django import forms

from apps.federation.choices import UpdateStatus
from apps.governance.choices import ActorKind


class DecisionForm(forms.Form):
    """Approve or reject a pending approval request; the console asks for a reason either way, for the audit trail."""

    decision = forms.ChoiceField(choices=[("approve", "Approve"), ("reject", "Reject")])
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        max_length=2000,
        help_text="Recorded in the audit log and shown to the requester.",
        error_messages={"required": "Give a reason for the decision: it is recorded in the audit log."},
    )


class OverrideForm(forms.Form):
    """Ask for an override of the promotion gate, or grant the one waiting (a second officer); a reason either way."""

    step = forms.ChoiceField(choices=[("request", "Ask for an override"), ("grant", "Grant the override")])
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2}),
        max_length=2000,
        help_text="Why the candidate should be promoted despite the gate; recorded in the audit log.",
        error_messages={"required": "An override needs a written reason: it is recorded in the audit log."},
    )


class UpdateFilterForm(forms.Form):
    """Filters of the update list; every field optional."""

    status = forms.ChoiceField(choices=[("", "any status"), *UpdateStatus.choices], required=False)
    device = forms.CharField(required=False, max_length=128, label="Device client id")
    code = forms.CharField(required=False, max_length=64, label="Rejection code")


class AuditFilterForm(forms.Form):
    """Filters of the audit log; every field optional."""

    verb = forms.CharField(required=False, max_length=100, label="Action contains")
    actor = forms.CharField(required=False, max_length=200, label="Actor contains")
    # The typed acting party's kind (AuditEvent.actor_kind), as the API's ?actor_kind= filters: e.g. every change
    # automation made, which no label substring picks out reliably. Events older than the typed actor have none.
    actor_kind = forms.ChoiceField(required=False, choices=[("", "Any"), *ActorKind.choices], label="Actor kind")
    object_type = forms.CharField(required=False, max_length=100, label="Object type (app.model)")
    object_id = forms.CharField(required=False, max_length=200, label="Object id")
    after = forms.DateTimeField(
        required=False, label="From (UTC)", widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    before = forms.DateTimeField(
        required=False, label="Until (UTC)", widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
