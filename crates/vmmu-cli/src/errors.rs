//! Turning a refused command line into the one line the command prints.
//!
//! clap's messages are several lines (usage, tips); the first line alone loses
//! what matters: the name of the missing argument, the valid values. This builds
//! the line from the error's context instead, so it always names what is wrong
//! and what would be valid.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::CommandFactory;

use crate::cli::{unmodelled_flag, Cli};

fn strings(e: &clap::Error, kind: ContextKind) -> Vec<String> {
    match e.get(kind) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        Some(ContextValue::StyledStr(s)) => vec![s.to_string()],
        Some(ContextValue::StyledStrs(v)) => v.iter().map(|s| s.to_string()).collect(),
        _ => Vec::new(),
    }
}

fn one(e: &clap::Error, kind: ContextKind) -> Option<String> {
    strings(e, kind).into_iter().next()
}

/// The subcommand path the user typed (`run demand-paging`), found by walking
/// the command tree along the arguments.
fn command_path(argv: &[String]) -> (Vec<String>, clap::Command) {
    let mut cmd = Cli::command();
    let mut path = Vec::new();
    for a in argv.iter().skip(1) {
        if a.starts_with('-') {
            break;
        }
        match cmd.find_subcommand(a) {
            Some(sub) => {
                path.push(a.clone());
                let sub = sub.clone();
                cmd = sub;
            }
            None => break,
        }
    }
    (path, cmd)
}

/// The flags a command takes, as `-v -b --json ...`.
fn flags_of(cmd: &clap::Command) -> String {
    cmd.get_arguments()
        .filter(|a| !a.is_positional() && !a.is_hide_set())
        .filter_map(|a| {
            a.get_short()
                .map(|c| format!("-{c}"))
                .or_else(|| a.get_long().map(|l| format!("--{l}")))
        })
        .filter(|f| f != "-h" && f != "-V")
        .collect::<Vec<_>>()
        .join(" ")
}

fn subcommands_of(cmd: &clap::Command) -> String {
    cmd.get_subcommands()
        .map(|c| c.get_name().to_string())
        .filter(|n| n != "help")
        .collect::<Vec<_>>()
        .join(", ")
}

/// Keep a message on one line whatever the user typed: control characters in
/// echoed arguments (a newline, a tab) are shown escaped.
pub(crate) fn single_line(s: &str) -> String {
    s.trim_end()
        .chars()
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .collect()
}

/// The one line for a refused command line.
pub(crate) fn one_line(e: &clap::Error, argv: &[String]) -> String {
    single_line(&one_line_raw(e, argv))
}

fn one_line_raw(e: &clap::Error, argv: &[String]) -> String {
    let (path, cmd) = command_path(argv);
    let at = if path.is_empty() {
        "vmmu".to_string()
    } else {
        format!("vmmu {}", path.join(" "))
    };
    let what = if path.len() >= 2 {
        "scenario"
    } else {
        "command"
    };
    match e.kind() {
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let name = cmd
                .get_subcommand_value_name()
                .unwrap_or("COMMAND")
                .to_string();
            format!("{at}: missing <{name}> (one of: {})", subcommands_of(&cmd))
        }
        ErrorKind::InvalidSubcommand => {
            let bad = one(e, ContextKind::InvalidSubcommand).unwrap_or_default();
            let kind = if path.first().is_some_and(|p| p == "run") {
                "scenario"
            } else if path.first().is_some_and(|p| p == "bench") {
                "benchmark"
            } else {
                what
            };
            format!(
                "{at}: unknown {kind} '{bad}' (valid: {})",
                subcommands_of(&cmd)
            )
        }
        ErrorKind::UnknownArgument => {
            let bad = one(e, ContextKind::InvalidArg).unwrap_or_default();
            let scenario = path.get(1).map(String::as_str).unwrap_or("");
            if let Some(why) = unmodelled_flag(scenario, &bad) {
                return format!("{at}: {bad}: {why}");
            }
            let hint = one(e, ContextKind::SuggestedArg)
                .map(|s| format!("; did you mean {s}?"))
                .unwrap_or_default();
            format!(
                "{at}: unexpected argument '{bad}'{hint} ({} takes: {})",
                path.last().map(String::as_str).unwrap_or("vmmu"),
                flags_of(&cmd)
            )
        }
        ErrorKind::MissingRequiredArgument => {
            let missing = strings(e, ContextKind::InvalidArg).join(", ");
            format!("{at}: missing {missing}")
        }
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            let arg = one(e, ContextKind::InvalidArg).unwrap_or_default();
            let val = one(e, ContextKind::InvalidValue).unwrap_or_default();
            let valid = strings(e, ContextKind::ValidValue);
            if !valid.is_empty() {
                return format!(
                    "{at}: invalid value '{val}' for {arg} (valid: {})",
                    valid.join(", ")
                );
            }
            // A value parser's own message (sizes, backings) says what is valid.
            let why = std::error::Error::source(e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "not a valid value".into());
            if val.is_empty() {
                format!("{at}: {arg} needs a value")
            } else {
                format!("{at}: invalid value '{val}' for {arg}: {why}")
            }
        }
        ErrorKind::ArgumentConflict => {
            let a = one(e, ContextKind::InvalidArg).unwrap_or_default();
            let b = strings(e, ContextKind::PriorArg).join(", ");
            format!("{at}: {a} cannot be used with {b}")
        }
        ErrorKind::TooManyValues | ErrorKind::NoEquals => first_line(e, &at),
        _ => first_line(e, &at),
    }
}

fn first_line(e: &clap::Error, at: &str) -> String {
    let text = e.render().to_string();
    let first = text
        .lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    format!("{at}: {first}")
}
