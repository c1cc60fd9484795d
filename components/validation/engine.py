"""Great Expectations, run the way this step needs it: one ephemeral context per validation run, one suite
(and one checkpoint, which also renders the Data Docs) per table, and the results turned into per-row reasons.

Every expectation carries its meaning in ``meta``: ``level`` is ``row`` (a failing row is quarantined with
``reason``) or ``dataset`` (any failure fails the whole step: schema checks); a row rule with ``fatal`` set
quarantines its rows *and* fails the step (split leakage).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

ROW = "row"
DATASET = "dataset"


def row_rule(expectation_cls: Any, reason: str, description: str, *, fatal: bool = False, **kwargs: Any) -> Any:
    """A row-level expectation: rows that fail it are quarantined with ``reason``."""
    meta = {"level": ROW, "reason": reason, "description": description, "fatal": fatal}
    return expectation_cls(meta=meta, **kwargs)


def must_be_true(column: str, reason: str, description: str, *, fatal: bool = False) -> Any:
    """Expect a derived boolean column to be True (null = not applicable, skipped by GX)."""
    import great_expectations as gx

    return row_rule(
        gx.expectations.ExpectColumnValuesToBeInSet, reason, description, fatal=fatal, column=column, value_set=[True]
    )


def not_null(column: str, reason: str | None = None, description: str | None = None) -> Any:
    """Rows where ``column`` is null fail with ``missing_<column>`` (or ``reason``)."""
    import great_expectations as gx

    return row_rule(
        gx.expectations.ExpectColumnValuesToNotBeNull,
        reason or f"missing_{column}",
        description or f"{column} is empty",
        column=column,
    )


def unique(column: str, reason: str | None = None, description: str | None = None) -> Any:
    """Every row sharing a value of ``column`` fails with ``duplicate_<column>`` (or ``reason``)."""
    import great_expectations as gx

    return row_rule(
        gx.expectations.ExpectColumnValuesToBeUnique,
        reason or f"duplicate_{column}",
        description or f"{column} occurs more than once",
        column=column,
    )


def id_rules(column: str) -> list[Any]:
    """An id column: present and unique."""
    return [not_null(column), unique(column)]


def between(column: str, reason: str, description: str, min_value: Any = None, max_value: Any = None) -> Any:
    """Rows whose ``column`` lies outside [min_value, max_value] (either bound optional) fail."""
    import great_expectations as gx

    return row_rule(
        gx.expectations.ExpectColumnValuesToBeBetween,
        reason,
        description,
        column=column,
        min_value=min_value,
        max_value=max_value,
    )


def in_set(column: str, reason: str, description: str, values: Sequence[Any]) -> Any:
    """Rows whose ``column`` is not one of ``values`` fail (nulls are left to :func:`not_null`)."""
    import great_expectations as gx

    return row_rule(
        gx.expectations.ExpectColumnValuesToBeInSet, reason, description, column=column, value_set=list(values)
    )


def same_as(column_a: str, column_b: str, reason: str, description: str, *, fatal: bool = False) -> Any:
    """Rows where both columns are set and differ fail."""
    import great_expectations as gx

    return row_rule(
        gx.expectations.ExpectColumnPairValuesToBeEqual,
        reason,
        description,
        fatal=fatal,
        column_A=column_a,
        column_B=column_b,
        ignore_row_if="either_value_is_missing",
    )


def dataset_rule(expectation_cls: Any, description: str, **kwargs: Any) -> Any:
    """A dataset-level expectation (schema): any failure fails the step."""
    return expectation_cls(meta={"level": DATASET, "description": description}, **kwargs)


def schema_rules(columns: dict[str, str], derived: Sequence[str]) -> list[Any]:
    """Column set (exact: missing and extra input columns both fail) and one type check per input column.

    ``columns`` maps input column -> pandas type name as GX reports it (``str``, ``int32``, ...); the derived
    columns our code adds are part of the validated frame, so they belong to the expected set.
    """
    import great_expectations as gx

    rules = [
        dataset_rule(
            gx.expectations.ExpectTableColumnsToMatchSet,
            "the table has exactly the contract's columns",
            column_set=[*columns, *derived],
            exact_match=True,
        )
    ]
    for col, type_name in columns.items():
        rules.append(
            dataset_rule(
                gx.expectations.ExpectColumnValuesToBeOfType,
                f"column {col!r} has type {type_name}",
                column=col,
                type_=type_name,
            )
        )
    return rules


@dataclass
class TableCheck:
    """One table to validate: its rows (input columns + derived columns) and its rules."""

    name: str
    """Table name used in reports, the quarantine file and the GX suite."""
    source: str
    """Where the rows came from, relative to the dataset root (for reports)."""
    frame: pd.DataFrame
    """Rows to validate, with a RangeIndex (the index is the row position)."""
    row_id_column: str
    """Column that identifies a row to a human (image_id, question_id, ...)."""
    rules: list[Any]
    """GX expectations built with :func:`row_rule` / :func:`dataset_rule`."""
    record: Callable[[int], Any]
    """Row position -> the row's original fields (JSON-serialisable), kept with quarantined rows."""
    problems: list[str] = field(default_factory=list)
    """Dataset-level problems found while reading the table (unreadable file, missing top-level key)."""

    def row_id(self, i: int) -> str | None:
        """Row i's id as text (None when it has none, or the table lacks the id column)."""
        if self.row_id_column not in self.frame.columns:
            return None
        value = self.frame[self.row_id_column].iat[i]
        return None if value is None or (isinstance(value, float) and value != value) else str(value)


@dataclass
class TableOutcome:
    """What validating one table found."""

    check: TableCheck
    row_reasons: dict[int, list[str]]
    """Row position -> every reason it failed (only failing rows)."""
    failures: list[str]
    """Dataset-level failures (schema, fatal row rules, rules that could not run)."""
    reason_descriptions: dict[str, str]
    gx_result: dict[str, Any] | None
    """The serialised GX suite validation result (None when GX did not run)."""

    @property
    def rows(self) -> int:
        return len(self.check.frame)

    @property
    def accepted_rows(self) -> list[int]:
        """Positions of the rows that passed every row rule."""
        return [i for i in range(self.rows) if i not in self.row_reasons]

    def accepted_ids(self) -> set[str]:
        """Row ids (as text) of the accepted rows."""
        return {i for i in map(self.check.row_id, self.accepted_rows) if i is not None}


def _rule_columns(expectation: Any) -> list[str]:
    cols = [getattr(expectation, k, None) for k in ("column", "column_A", "column_B")]
    return [c for c in cols if isinstance(c, str)]


def _describe_failure(er: Any) -> str:
    """A readable one-liner for a failed dataset-level expectation."""
    cfg = er.expectation_config
    res = er.result or {}
    if cfg.type == "expect_table_columns_to_match_set":
        mism = (res.get("details") or {}).get("mismatched") or {}
        parts = []
        if mism.get("missing"):
            parts.append(f"missing columns {sorted(mism['missing'])}")
        if mism.get("unexpected"):
            parts.append(f"unexpected columns {sorted(mism['unexpected'])}")
        return "schema mismatch: " + ("; ".join(parts) or f"columns are {res.get('observed_value')}")
    if cfg.type == "expect_column_values_to_be_of_type":
        observed = res.get("observed_value")
        if observed is None and res.get("unexpected_count"):
            observed = (
                f"{res['unexpected_count']} values of other types, e.g. {res.get('partial_unexpected_list', [])[:3]}"
            )
        return (
            f"schema mismatch: column {cfg.kwargs.get('column')!r} should be {cfg.kwargs.get('type_')}, got {observed}"
        )
    return f"{cfg.meta.get('description', cfg.type)}: failed ({json.dumps(res, default=str)[:200]})"


class GxValidator:
    """Owns the GX context of one validation run (creating it is the slow part: do it once)."""

    def __init__(self, data_docs_dir: Path | None) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self._gx = gx
        self.site = "vilbert_validate"
        sites = {}
        if data_docs_dir is not None:
            sites[self.site] = {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(data_docs_dir).resolve()),  # GX refuses relative paths
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            progress_bars=ProgressBarsConfig(globally=False),  # no tqdm bars in a pipeline step's log
            analytics_enabled=False,
            data_docs_sites=sites,
        )
        self.context = gx.get_context(project_config=config, mode="ephemeral")
        self.datasource = self.context.data_sources.add_pandas("vilbert_dataset")
        self.data_docs = data_docs_dir is not None

    def validate(self, check: TableCheck) -> TableOutcome:
        """Run the table's suite on its frame and map the results to rows and dataset-level failures."""
        gx = self._gx
        failures = list(check.problems)
        descriptions: dict[str, str] = {}
        present = set(check.frame.columns)
        runnable = []
        for rule in check.rules:
            missing = [c for c in _rule_columns(rule) if c not in present]
            if missing:  # the schema check reports the missing column; this rule cannot run without it
                failures.append(f"rule {rule.meta.get('reason') or type(rule).__name__} not run: no column {missing}")
            else:
                runnable.append(rule)
        if not runnable:
            return TableOutcome(check, {}, failures, descriptions, None)

        # Built whole, then added once: add_expectation on a stored suite re-serialises the suite every time.
        suite = self.context.suites.add(gx.ExpectationSuite(name=check.name, expectations=runnable))
        batch = self.datasource.add_dataframe_asset(check.name).add_batch_definition_whole_dataframe("all_rows")
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=check.name, data=batch, suite=suite)
        )
        frame = check.frame.reset_index(drop=True)
        if self.data_docs:
            actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[self.site])]
            checkpoint = self.context.checkpoints.add(
                gx.Checkpoint(
                    name=check.name, validation_definitions=[definition], actions=actions, result_format="COMPLETE"
                )
            )
            run = checkpoint.run(batch_parameters={"dataframe": frame})
            result = next(iter(run.run_results.values()))
        else:
            result = definition.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")

        row_reasons: dict[int, list[str]] = {}
        for er in result.results:
            config = er.expectation_config
            meta = (config.meta if config is not None else None) or {}
            exc = er.exception_info or {}
            if exc.get("raised_exception"):
                what = meta.get("reason", config.type if config is not None else "an expectation")
                failures.append(f"{what} could not run: {exc.get('exception_message')}")
                continue
            if er.success:
                continue
            if meta.get("level") == ROW:
                reason = meta["reason"]
                descriptions[reason] = meta.get("description", reason)
                rows = [int(i) for i in er.result.get("unexpected_index_list") or []]
                if not rows:  # never quietly accept rows of a failed rule
                    failures.append(f"{reason}: the rule failed but GX named no rows ({er.result})")
                for i in rows:
                    reasons = row_reasons.setdefault(i, [])
                    if reason not in reasons:
                        reasons.append(reason)
                if meta.get("fatal"):
                    ids = [str(check.row_id(i)) for i in rows[:5]]
                    failures.append(f"{reason}: {len(rows)} row(s) — {meta.get('description')} (e.g. {', '.join(ids)})")
            else:
                failures.append(_describe_failure(er))
        order = {r.meta.get("reason"): k for k, r in reversed(list(enumerate(runnable)))}
        for reasons in row_reasons.values():  # rule order, not GX's result order: stable reports
            reasons.sort(key=lambda r: order.get(r, len(order)))
        return TableOutcome(check, dict(sorted(row_reasons.items())), failures, descriptions, result.to_json_dict())
