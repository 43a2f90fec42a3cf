"""A workflow's summary: per structure, its line through every step."""

from __future__ import annotations

from pydantic import BaseModel, Field

from atomforge.flows.store.records import StructureResult

NOT_SELECTED = "not selected"


class StepReport(BaseModel):
    """How one step of a workflow went, and the flow run that computed it."""

    step: str
    flow_run_id: str
    engine: str
    kind: str
    deployment: str | None = None
    n_structures: int
    n_completed: int


class WorkflowLine(BaseModel):
    """One input structure's way through the steps: a cell per step it reached."""

    name: str
    formula: str
    steps: dict[str, str] = Field(
        default_factory=dict, description="Step name -> what happened to it there."
    )
    last_id: str | None = Field(None, description="Its last completed result, 'run/id'.")


class WorkflowReport(BaseModel):
    """A workflow run: its steps and every structure's line; documents are in the store."""

    flow_run_id: str
    name: str
    steps: list[StepReport] = Field(default_factory=list)
    lines: list[WorkflowLine] = Field(default_factory=list)


def cell(result: StructureResult) -> str:
    """Return what a step did with one structure, as a table cell."""
    if not result.ok:
        return f"{result.status}: {result.message}"[:80]
    text = f"{result.energy_per_atom_eV:.4f} eV/atom"
    if result.gap_eV is not None:
        text += f", gap {result.gap_eV:.2f} eV"
    return text


class Lines:
    """The lines of a workflow, filled step by step, following each result's parent."""

    def __init__(self) -> None:
        self.lines: dict[str, WorkflowLine] = {}
        self.line_of: dict[str, str] = {}

    def record(self, step: str, results: list[StructureResult]) -> None:
        """Enter ``results`` of ``step`` on the lines of the structures they started from."""
        for result in results:
            line_key = self.line_of.get(result.parent_id or "", result.ref)
            line = self.lines.setdefault(line_key, WorkflowLine(name=result.name, formula=""))
            line.formula = line.formula or result.formula
            line.steps[step] = cell(result)
            self.line_of[result.ref] = line_key
            if result.ok:
                line.last_id = result.ref

    def not_selected(self, step: str, results: list[StructureResult]) -> None:
        """Mark completed ``results`` that ``step``'s selection left out."""
        for result in results:
            if result.ok:
                self.lines[self.line_of[result.ref]].steps[step] = NOT_SELECTED

    def ordered(self) -> list[WorkflowLine]:
        """Return the lines, in the order the first step computed them."""
        return list(self.lines.values())


def summary_rows(lines: list[WorkflowLine], steps: list[str]) -> list[dict[str, str]]:
    """Return the table rows of a workflow: structure, formula, a cell per step, result."""
    return [
        {
            "structure": line.name,
            "formula": line.formula,
            **{step: line.steps.get(step, "") for step in steps},
            "last result": line.last_id or "",
        }
        for line in lines
    ]


def summary_markdown(report: WorkflowReport) -> str:
    """Return the workflow's markdown summary: the steps, then each structure's line."""
    names = [step.step for step in report.steps]
    out = [f"# workflow {report.name}", "", "| step | engine | kind | completed | flow run |"]
    out.append("|---|---|---|---|---|")
    for step in report.steps:
        out.append(
            f"| {step.step} | {step.engine} | {step.kind} | "
            f"{step.n_completed} of {step.n_structures} | `{step.flow_run_id}` |"
        )
    out += ["", "| structure | formula | " + " | ".join(names) + " |"]
    out.append("|---|---|" + "---|" * len(names))
    for line in report.lines:
        cells = " | ".join(line.steps.get(name, "") for name in names)
        out.append(f"| {line.name} | {line.formula} | {cells} |")
    out += ["", "`atomforge show --chain <run/id>` follows a result back to its input."]
    return "\n".join(out)
