//! The command line's errors as the user is told them: clap's own, with each value they quote
//! cut to a bound ([`cut_value`]) and each flag whose value came from its environment variable
//! named with it ([`given_by_env`]); and the usage errors the commands find themselves
//! ([`usage_error`]), said with the subcommand's usage as clap's.

use clap::CommandFactory;

use crate::Cli;

/// A usage error of the subcommand `name` (exit 2), said with its usage as clap's own.
pub(crate) fn usage_error(name: &str, why: impl std::fmt::Display) -> clap::Error {
    let mut cmd = Cli::command();
    cmd.build();
    let error = clap::error::ErrorKind::ValueValidation;
    match cmd.find_subcommand_mut(name) {
        Some(sub) => sub.error(error, why),
        None => cmd.error(error, why),
    }
}

/// Characters of a value an error quotes: a rejected argument may be megabytes (a name, a
/// file read into an argument), and was echoed whole.
const VALUE_SHOWN: usize = 64;

/// `value` as an error quotes it: whole up to [`VALUE_SHOWN`] characters, else that many and
/// how long it was (`nnnn… (1025 characters)`).
pub(crate) fn cut_value(value: &str) -> std::borrow::Cow<'_, str> {
    match value.char_indices().nth(VALUE_SHOWN) {
        Some((at, _)) => {
            let chars = value.chars().count();
            format!("{}… ({chars} characters)", &value[..at]).into()
        }
        None => value.into(),
    }
}

/// The first key of `pairs` (a repeatable `KEY=VALUE` flag, in the order given) given again
/// with another value, said naming `flag`, the key and both values, each quoted cut by
/// [`cut_value`] (a value may be long, or a secret an `--env` passes), then `why`: a map keeps
/// one value a key, and the last was kept in silence. The same `KEY=VALUE` again is the same
/// pair, taken once.
pub(crate) fn one_value_a_key(
    flag: &str,
    pairs: &[(String, String)],
    why: &str,
) -> Result<(), String> {
    let mut taken = std::collections::HashMap::<&str, &str>::new();
    for (key, value) in pairs {
        match taken.insert(key, value) {
            Some(first) if first != value => {
                return Err(format!(
                    "{flag} {:?} given twice with different values, {:?} and {:?}: {why}",
                    cut_value(key),
                    cut_value(first),
                    cut_value(value)
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Characters of a value parser's own words an error shows: more than any of them says, unless
/// it quotes the value.
const REASON_SHOWN: usize = 512;

/// `e` with every value it quotes (the rejected value, an unknown argument or subcommand)
/// cut by [`cut_value`]: clap quotes them whole. A value parser's own words that quote the
/// value again (`name "…"`, which clap cannot cut) are cut too, the error made again in
/// clap's words.
pub(crate) fn bounded(mut e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let long: Vec<_> = e
        .context()
        .filter_map(|(kind, v)| match v {
            ContextValue::String(s) if s.chars().nth(VALUE_SHOWN).is_some() => {
                Some((kind, s.clone(), cut_value(s).into_owned()))
            }
            _ => None,
        })
        .collect();
    let cut = |text: &str| {
        long.iter()
            .fold(text.to_owned(), |t, (_, whole, cut)| t.replace(whole, cut))
    };
    // The values themselves, and where they are quoted again (a tip: `use '-- --x…'`).
    let quoting: Vec<_> = e
        .context()
        .filter(|(kind, _)| *kind != ContextKind::Usage)
        .filter_map(|(kind, v)| {
            let quotes = |text: &str| long.iter().any(|(_, whole, _)| text.contains(whole));
            let v = match v {
                ContextValue::String(s) if quotes(s) => ContextValue::String(cut(s)),
                ContextValue::Strings(all) if all.iter().any(|s| quotes(s)) => {
                    ContextValue::Strings(all.iter().map(|s| cut(s)).collect())
                }
                ContextValue::StyledStr(s) if quotes(&s.to_string()) => {
                    ContextValue::StyledStr(cut(&s.to_string()).into())
                }
                ContextValue::StyledStrs(all) if all.iter().any(|s| quotes(&s.to_string())) => {
                    ContextValue::StyledStrs(
                        all.iter().map(|s| cut(&s.to_string()).into()).collect(),
                    )
                }
                _ => return None,
            };
            Some((kind, v))
        })
        .collect();
    for (kind, v) in quoting {
        e.insert(kind, v);
    }
    let Some(mut reason) = std::error::Error::source(&e).map(ToString::to_string) else {
        return e;
    };
    if reason.chars().nth(REASON_SHOWN).is_none() {
        return e;
    }
    for (_, whole, cut) in &long {
        reason = reason
            .replace(&format!("{whole:?}"), &format!("{cut:?}"))
            .replace(whole.as_str(), cut);
    }
    if let Some((at, _)) = reason.char_indices().nth(REASON_SHOWN) {
        reason.truncate(at);
        reason.push('…');
    }
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) else {
        return e;
    };
    let said = format!(
        "invalid value '{value}' for '{arg}': {reason}\n\nFor more information, try '--help'.\n"
    );
    clap::Error::raw(e.kind(), said).with_cmd(&Cli::command())
}

/// The arguments clap's error `e` names whose value came from their environment variable,
/// each as the error quotes it (`--id <ID>`) with the variable: the error names the flag
/// alone, and the user looks for a flag never typed. Clap takes a variable's value only when
/// the command line `argv` does not give the flag, so an argument is taken to have its value
/// from its variable when the words before `--` do not name it and the variable `is_set`.
pub(crate) fn given_by_env(
    e: &clap::Error,
    argv: &[std::ffi::OsString],
    is_set: impl Fn(&std::ffi::OsStr) -> bool,
) -> Vec<(String, String)> {
    use clap::error::{ContextKind, ContextValue};
    let named: Vec<&String> = [ContextKind::InvalidArg, ContextKind::PriorArg]
        .into_iter()
        .filter_map(|kind| e.get(kind))
        .flat_map(|v| match v {
            ContextValue::String(one) => std::slice::from_ref(one),
            ContextValue::Strings(all) => all.as_slice(),
            _ => &[],
        })
        .collect();
    if named.is_empty() {
        return Vec::new();
    }
    let words = command_words(argv);
    let chain = subcommands(Cli::command(), &words);
    named
        .into_iter()
        .filter_map(|quoted| {
            let long = quoted.strip_prefix("--")?.split([' ', '=']).next()?;
            let arg = chain
                .iter()
                .rev()
                .find_map(|c| c.get_arguments().find(|a| a.get_long() == Some(long)))?;
            let var = arg.get_env()?;
            (!typed(arg, &words) && is_set(var))
                .then(|| (quoted.clone(), var.to_string_lossy().into_owned()))
        })
        .collect()
}

/// The words of the command line `argv` that name subcommands and flags: those before `--`
/// (after it every word is a value, a submitted command's own flags).
fn command_words(argv: &[std::ffi::OsString]) -> Vec<std::borrow::Cow<'_, str>> {
    argv.iter()
        .skip(1)
        .take_while(|w| *w != "--")
        .map(|w| w.to_string_lossy())
        .collect()
}

/// The subcommands `words` name, outermost first, from `root` on: an argument is looked up
/// from the innermost out (a global one, `--log`, is the root's).
fn subcommands(root: clap::Command, words: &[std::borrow::Cow<'_, str>]) -> Vec<clap::Command> {
    let mut chain = vec![root];
    for w in words {
        let sub = chain.last().and_then(|c| c.find_subcommand(&**w)).cloned();
        chain.extend(sub);
    }
    chain
}

/// Whether `words` give `arg` as a flag (`--x`, `--x=v`, an alias, `-x`): then clap took its
/// value from there, not from its environment variable.
fn typed(arg: &clap::Arg, words: &[std::borrow::Cow<'_, str>]) -> bool {
    let longs = arg
        .get_long()
        .into_iter()
        .chain(arg.get_all_aliases().into_iter().flatten());
    let shorts: Vec<char> = arg.get_short_and_visible_aliases().unwrap_or_default();
    words.iter().any(|w| match w.strip_prefix("--") {
        Some(flag) => longs
            .clone()
            .any(|l| flag == l || flag.strip_prefix(l).is_some_and(|r| r.starts_with('='))),
        None => w
            .strip_prefix('-')
            .is_some_and(|s| shorts.iter().any(|c| s.starts_with(*c))),
    })
}

/// `e` with each argument of `given` ([`given_by_env`]) followed by ` (given by TETHER_X)`
/// where it quotes it, as the settings' own errors name a variable; `e` itself when none is.
pub(crate) fn with_env_named(e: clap::Error, given: &[(String, String)]) -> clap::Error {
    if given.is_empty() {
        return e;
    }
    let text = e.render().to_string();
    let mut said = text.strip_prefix("error: ").unwrap_or(&text).to_owned();
    for (arg, var) in given {
        let quoted = format!("'{arg}'");
        said = said.replacen(&quoted, &format!("{quoted} (given by {var})"), 1);
    }
    clap::Error::raw(e.kind(), said).with_cmd(&Cli::command())
}

/// The arguments whose value came from their environment variable (as in [`given_by_env`])
/// and that require an argument clap's error `e` says is missing, each as clap quotes it
/// (`--tls-cert <TLS_CERT>`) with the variable: `TETHER_TLS_CERT` set alone made clap say only
/// that `--tls-key` was not provided, and the user, who typed neither, did not know what
/// required it. Clap does not say which argument requires another, so an argument is taken
/// to be one when `parse`, given the command with that argument's variable taken off it, no
/// longer finds one of those arguments missing. Only when `e` is that error: the command line
/// is parsed again once for each argument its variables gave.
pub(crate) fn required_by_env(
    e: &clap::Error,
    argv: &[std::ffi::OsString],
    is_set: impl Fn(&std::ffi::OsStr) -> bool,
    parse: impl Fn(clap::Command) -> Result<clap::ArgMatches, clap::Error>,
) -> Vec<(String, String)> {
    use clap::error::ErrorKind::MissingRequiredArgument;
    if e.kind() != MissingRequiredArgument {
        return Vec::new();
    }
    let missing = |e: &clap::Error| -> Vec<String> {
        use clap::error::{ContextKind, ContextValue};
        match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(one)) => vec![one.clone()],
            Some(ContextValue::Strings(all)) => all.clone(),
            _ => Vec::new(),
        }
    };
    let missed = missing(e);
    let words = command_words(argv);
    // Built: an argument is quoted as clap quotes it (`--tls-cert <TLS_CERT>`) only then.
    let mut root = Cli::command();
    root.build();
    let chain = subcommands(root, &words);
    let path: Vec<&str> = chain.iter().skip(1).map(clap::Command::get_name).collect();
    let mut found = Vec::new();
    for (depth, cmd) in chain.iter().enumerate() {
        for arg in cmd.get_arguments() {
            let Some(var) = arg.get_env().filter(|v| is_set(v)) else {
                continue;
            };
            if typed(arg, &words) {
                continue;
            }
            // A global argument is its root's (its copies in the subcommands are clap's).
            if depth > 0 && arg.is_global_set() {
                continue;
            }
            let Some(cmd) = without_env(Cli::command(), &path[..depth], arg.get_id()) else {
                continue;
            };
            let still = match parse(cmd) {
                Err(again) if again.kind() == MissingRequiredArgument => missing(&again),
                _ => Vec::new(),
            };
            if missed.iter().any(|m| !still.contains(m)) {
                found.push((arg.to_string(), var.to_string_lossy().into_owned()));
            }
        }
    }
    found
}

/// `cmd` with the argument `id` of its subcommand at `path` (none: its own) read from no
/// environment variable; `None` when `cmd` has no such subcommand or argument (one clap makes
/// as it builds the command: `help`, a global argument copied into a subcommand).
fn without_env(cmd: clap::Command, path: &[&str], id: &clap::Id) -> Option<clap::Command> {
    match path.split_first() {
        None => {
            let has = cmd.get_arguments().any(|a| a.get_id() == id);
            has.then(|| cmd.mut_arg(id, |a| a.env(None::<&'static str>)))
        }
        Some((name, rest)) => {
            let sub = cmd
                .get_subcommands()
                .find(|s| s.get_name() == *name)?
                .clone();
            let sub = without_env(sub, rest, id)?;
            Some(cmd.mut_subcommand(*name, |_| sub))
        }
    }
}

/// `e`, clap's error that arguments are missing, followed by what required them:
/// `by` ([`required_by_env`]), each named with its variable, and what to do; `e` itself when
/// `by` is empty.
pub(crate) fn with_requirers_named(e: clap::Error, by: &[(String, String)]) -> clap::Error {
    if by.is_empty() {
        return e;
    }
    let text = e.render().to_string();
    let mut said = text.strip_prefix("error: ").unwrap_or(&text).to_owned();
    // Clap lists the missing arguments a line each, indented, before its usage.
    let at = said.find("\n\nUsage:").unwrap_or(said.trim_end().len());
    let missing = said[..at].lines().filter(|l| l.starts_with("  ")).count();
    let named: Vec<String> = by
        .iter()
        .map(|(arg, var)| format!("'{arg}' (given by {var})"))
        .collect();
    let vars: Vec<&str> = by.iter().map(|(_, var)| var.as_str()).collect();
    let line = format!(
        "{} {} {}: give {} too, or unset {}",
        named.join(" and "),
        if by.len() == 1 { "requires" } else { "require" },
        if missing == 1 { "it" } else { "them" },
        if missing == 1 { "it" } else { "them" },
        vars.join(" and ")
    );
    said.insert_str(at, &format!("\n\n{line}"));
    if !said.ends_with('\n') {
        said.push('\n');
    }
    clap::Error::raw(e.kind(), said).with_cmd(&Cli::command())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// Every argument of every command, given a value of 100,000 characters that it refuses,
    /// is refused with an error of bounded length: the value quoted cut, by clap and by the
    /// argument's own parser. Clap quoted it whole, and some parsers quoted it again.
    #[test]
    fn an_over_long_value_is_quoted_cut_in_the_error_of_every_argument() {
        let long = "x".repeat(100_000);
        let mut tried = 0;
        let mut long_errors = Vec::new();
        let mut stack = vec![(vec!["tether".to_owned()], Cli::command())];
        while let Some((path, cmd)) = stack.pop() {
            for sub in cmd.get_subcommands() {
                let mut p = path.clone();
                p.push(sub.get_name().to_owned());
                stack.push((p, sub.clone()));
            }
            // An argument or a subcommand it does not know.
            for unknown in [format!("--{long}"), long.clone()] {
                let mut argv = path.clone();
                argv.push(unknown);
                tried += 1;
                if let Err(e) = Cli::try_parse_from(&argv).and_then(Cli::checked) {
                    let said = bounded(e).render().to_string();
                    if said.len() >= 2_000 {
                        long_errors.push(format!("{path:?} unknown: {} bytes", said.len()));
                    }
                }
            }
            for arg in cmd.get_arguments() {
                if !arg.get_action().takes_values() {
                    continue;
                }
                let mut argv = path.clone();
                match (arg.get_long(), arg.is_last_set()) {
                    (Some(l), _) => argv.push(format!("--{l}")),
                    (None, true) => argv.push("--".to_owned()),
                    (None, false) => {}
                }
                argv.push(long.clone());
                tried += 1;
                let Err(e) = Cli::try_parse_from(&argv).and_then(Cli::checked) else {
                    continue;
                };
                let said = bounded(e).render().to_string();
                if said.len() >= 2_000 {
                    long_errors.push(format!(
                        "{:?}: {} bytes: {}",
                        &argv[1..argv.len() - 1],
                        said.len(),
                        &said[..said.len().min(300)]
                    ));
                }
            }
        }
        assert!(tried > 50, "{tried} arguments tried");
        assert!(long_errors.is_empty(), "{}", long_errors.join("\n"));
    }

    /// A value clap refused is said to come from its environment variable when the command
    /// line did not give the flag (clap then takes the variable's value), in each form a flag
    /// may be typed, and only then.
    #[test]
    fn a_refused_value_is_named_by_its_variable_when_no_flag_gave_it() {
        let os =
            |words: &[&str]| -> Vec<std::ffi::OsString> { words.iter().map(Into::into).collect() };
        let typed = ["tether", "coordinator", "--idle-coalesce", "soon"];
        let e = Cli::try_parse_from(typed).err().expect("refused");
        let var = |v: &std::ffi::OsStr| v == "TETHER_IDLE_COALESCE";
        let arg = "--idle-coalesce <IDLE_COALESCE>".to_owned();
        let from_env = vec![(arg.clone(), "TETHER_IDLE_COALESCE".to_owned())];
        let none = Vec::new();
        for (argv, want) in [
            (&["tether", "coordinator"][..], &from_env),
            (
                &["tether", "coordinator", "--", "--idle-coalesce"][..],
                &from_env,
            ),
            (&typed[..], &none),
            (
                &["tether", "coordinator", "--idle-coalesce=soon"][..],
                &none,
            ),
        ] {
            assert_eq!(&given_by_env(&e, &os(argv), var), want, "{argv:?}");
        }
        let unset = given_by_env(&e, &os(&["tether", "coordinator"]), |_| false);
        assert_eq!(unset, none);
        let said = with_env_named(e, &from_env).render().to_string();
        assert!(
            said.contains(&format!("'{arg}' (given by TETHER_IDLE_COALESCE)")),
            "{said}"
        );
        assert!(said.starts_with("error: invalid value 'soon'"), "{said}");
        // A worker's id from TETHER_WORKER_ID: the worker's argument, not the client's.
        let e = Cli::try_parse_from(["tether", "worker", "--id", "a b"])
            .err()
            .expect("refused");
        let given = given_by_env(&e, &os(&["tether", "worker"]), |v| v == "TETHER_WORKER_ID");
        assert_eq!(
            given,
            [("--id <ID>".to_owned(), "TETHER_WORKER_ID".to_owned())]
        );
    }

    #[test]
    fn a_value_is_quoted_whole_up_to_its_bound_and_cut_past_it() {
        let at = "é".repeat(VALUE_SHOWN);
        assert_eq!(cut_value(&at), at);
        let past = format!("{at}é");
        assert_eq!(
            cut_value(&past),
            format!("{at}… ({} characters)", VALUE_SHOWN + 1)
        );
    }
}
