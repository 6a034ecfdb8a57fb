//! A Mermaid state diagram of a saga definition.

use std::fmt::Write as _;

use crate::definition::{Action, Exhausted, SagaData, SagaDefinition, StepKind};

fn state_id(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

impl<D: SagaData> SagaDefinition<D> {
    /// A [Mermaid](https://mermaid.js.org) `stateDiagram-v2` of the saga:
    /// every path the engine can take. Its steps forward; where each
    /// failure leads (the compensations in reverse; a remote step whose
    /// outcome is unknown compensated as if it took effect; a pivot whose
    /// outcome is unknown parked; a retryable step parked or, with
    /// [`Exhausted::DeadLetterAndContinue`], skipped with a dead letter);
    /// compensations that fail parking; how a parked saga resumes; retries
    /// and timeouts. Paste it into any Mermaid renderer (GitHub renders it
    /// in a `mermaid` code block).
    ///
    /// ```
    /// # use saga_core::*;
    /// # #[derive(Clone, serde::Serialize, serde::Deserialize)] struct O;
    /// let saga = SagaDefinition::<O>::builder("order")
    ///     .step(Step::<O>::local("create", |_| Ok(())).compensate_local(|_| Ok(())))
    ///     .step(Step::remote("reserve", "inventory.requests").command(|_: &O| "RESERVE").pivot())
    ///     .build().unwrap();
    /// let diagram = saga.to_mermaid();
    /// assert!(diagram.starts_with("stateDiagram-v2"));
    /// assert!(diagram.contains("reserve --> undo_create: fails"));
    /// ```
    pub fn to_mermaid(&self) -> String {
        let steps = self.steps();
        let mut out = String::from("stateDiagram-v2\n");
        let _ = writeln!(out, "    %% saga `{}`", self.name());
        for step in steps {
            let id = state_id(&step.name);
            let how = match &step.forward {
                Some(Action::Remote { channel, .. }) => format!("command → {channel}"),
                _ => "local".to_owned(),
            };
            let _ = writeln!(out, "    {id}: {} ({}, {how})", step.name, step.kind);
            if step.kind == StepKind::Compensatable {
                if let Some(c) = &step.compensation {
                    let how = match c {
                        Action::Remote { channel, .. } => format!("command → {channel}"),
                        Action::Local(_) => "local".to_owned(),
                    };
                    let _ = writeln!(out, "    undo_{id}: compensate {} ({how})", step.name);
                }
            }
        }
        let _ = writeln!(out, "    Parked: Parked (dead letter, operator)");

        // Forward path.
        let first = state_id(&steps[0].name);
        let _ = writeln!(out, "    [*] --> {first}");
        for pair in steps.windows(2) {
            let _ = writeln!(
                out,
                "    {} --> {}: ok",
                state_id(&pair[0].name),
                state_id(&pair[1].name)
            );
        }
        let last = state_id(&steps[steps.len() - 1].name);
        let _ = writeln!(out, "    {last} --> Completed: ok");
        let _ = writeln!(out, "    Completed --> [*]");

        // The compensation that runs first when step `i` fails: the nearest
        // compensatable step at or before `i` that has a compensation.
        let undo_from = |i: usize, inclusive: bool| -> String {
            let end = if inclusive { i + 1 } else { i };
            steps[..end]
                .iter()
                .rev()
                .find(|s| s.kind == StepKind::Compensatable && s.compensation.is_some())
                .map(|s| format!("undo_{}", state_id(&s.name)))
                .unwrap_or_else(|| "Compensated".to_owned())
        };
        let mut any_compensated = false;
        let mut any_parked = false;
        for (i, step) in steps.iter().enumerate() {
            let id = state_id(&step.name);
            let remote = matches!(step.forward, Some(Action::Remote { .. }));
            if step.retry.max_attempts > 1 {
                let _ = writeln!(
                    out,
                    "    {id} --> {id}: retry (up to {} attempts)",
                    step.retry.max_attempts
                );
            }
            if let Some(t) = step.timeout {
                let _ = writeln!(out, "    note right of {id}: timeout {t:?} per attempt");
            }
            match step.kind {
                StepKind::Compensatable => {
                    let target = undo_from(i, false);
                    any_compensated |= target == "Compensated";
                    let _ = writeln!(out, "    {id} --> {target}: fails");
                    if remote && step.compensation.is_some() {
                        let _ = writeln!(out, "    {id} --> undo_{id}: outcome unknown");
                    }
                }
                StepKind::Pivot => {
                    let target = undo_from(i, false);
                    any_compensated |= target == "Compensated";
                    let _ = writeln!(out, "    {id} --> {target}: fails");
                    if remote {
                        any_parked = true;
                        let _ = writeln!(out, "    {id} --> Parked: outcome unknown");
                    }
                }
                StepKind::Retryable => match step.exhausted {
                    Exhausted::DeadLetterAndContinue => {
                        let next = steps
                            .get(i + 1)
                            .map(|s| state_id(&s.name))
                            .unwrap_or_else(|| "Completed".to_owned());
                        let _ = writeln!(out, "    {id} --> {next}: gives up (dead letter)");
                    }
                    _ => {
                        any_parked = true;
                        let _ = writeln!(out, "    {id} --> Parked: retries exhausted");
                    }
                },
            }
            if step.kind == StepKind::Compensatable && step.compensation.is_some() {
                let next = undo_from(i, false);
                any_compensated |= next == "Compensated";
                any_parked = true;
                let _ = writeln!(out, "    undo_{id} --> {next}: undone");
                let _ = writeln!(out, "    undo_{id} --> Parked: compensation fails");
            }
        }
        if any_parked {
            let _ = writeln!(
                out,
                "    note right of Parked: resumed by a late reply, or an operator's retry or skip"
            );
        }
        if any_compensated {
            let _ = writeln!(out, "    Compensated --> [*]");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::*;

    #[derive(Clone, serde::Serialize, serde::Deserialize)]
    struct O;

    #[test]
    fn diagram_shows_every_path_the_engine_can_take() {
        let saga = SagaDefinition::<O>::builder("order")
            .step(Step::<O>::local("create-order", |_| Ok(())).compensate_local(|_| Ok(())))
            .step(
                Step::remote("reserve", "inventory.requests")
                    .command(|_: &O| "RESERVE")
                    .compensate_remote("inventory.requests", |_: &O| "RELEASE")
                    .timeout(std::time::Duration::from_secs(5)),
            )
            .step(
                Step::remote("charge", "payments")
                    .command(|_: &O| "CHARGE")
                    .pivot(),
            )
            .step(Step::<O>::local("confirm", |_| Ok(())).retryable())
            .step(
                Step::remote("notify", "mail")
                    .command(|_: &O| "MAIL")
                    .retryable()
                    .on_exhausted(Exhausted::DeadLetterAndContinue),
            )
            .build()
            .unwrap();
        let d = saga.to_mermaid();
        for line in [
            "[*] --> create_order",
            "create_order --> reserve: ok",
            "reserve --> charge: ok",
            "notify --> Completed: ok",
            "confirm --> notify: ok",
            "notify --> Completed: gives up (dead letter)",
            "charge --> Parked: outcome unknown",
            "reserve --> undo_reserve: outcome unknown",
            "note right of Parked: resumed by a late reply, or an operator's retry or skip",
            "charge --> undo_reserve: fails",
            "undo_reserve --> undo_create_order: undone",
            "undo_create_order --> Compensated: undone",
            "create_order --> Compensated: fails",
            "confirm --> Parked: retries exhausted",
            "note right of reserve: timeout 5s per attempt",
            "Compensated --> [*]",
        ] {
            assert!(d.contains(line), "missing `{line}` in\n{d}");
        }
    }
}
