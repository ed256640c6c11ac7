//! Object names (core): hosts, the switch, ports and VMs.
//!
//! A name becomes a socket path under the run directory, a file on the datastore, a
//! certificate subject and a column in every table, so one rule holds for all of
//! them: `[a-z0-9][a-z0-9-]{0,30}`. It admits no path separator, no dot, no upper
//! case (names compare equal only when their bytes do) and nothing a shell or a
//! file system treats specially; 31 bytes leave room for a suffix such as `.sock`
//! or `.lock` within every limit (an interface name is 15 bytes, a Unix socket path
//! 107).

use std::fmt;

/// Longest name, in bytes.
pub const MAX_LEN: usize = 31;

/// A name that breaks the rule, with what it names (`host`, `VM`, `port`, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} name {name:?}: {why} (use 1 to {MAX_LEN} of a-z 0-9 and '-', starting with a letter or digit)")]
pub struct NameError {
    pub what: &'static str,
    pub name: String,
    pub why: &'static str,
}

/// Checks `name` against the rule; `what` says what it names, for the message.
pub fn validate(what: &'static str, name: &str) -> Result<(), NameError> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_LEN {
        Some("it is too long")
    } else if name.starts_with('-') {
        Some("it starts with '-'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("it holds a character outside a-z 0-9 '-'")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(NameError {
            what,
            // Keep the message one readable line even for a 200-byte name.
            name: name.chars().take(40).collect(),
            why,
        }),
    }
}

/// A validated name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub fn new(what: &'static str, name: &str) -> Result<Name, NameError> {
        validate(what, name)?;
        Ok(Name(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_pass() {
        for n in [
            "silo104",
            "vm1",
            "switch",
            "a",
            "0",
            "rack-2-host-10",
            &"a".repeat(31),
        ] {
            assert_eq!(validate("host", n), Ok(()), "{n}");
        }
    }

    #[test]
    fn names_that_could_escape_or_confuse_are_refused() {
        let cases = [
            ("../x", "outside"),
            ("a/b", "outside"),
            ("", "empty"),
            ("-x", "starts with"),
            ("Silo104", "outside"),
            ("a.b", "outside"),
            ("a b", "outside"),
            ("vm\u{e9}", "outside"),
        ];
        for (n, why) in cases {
            let e = validate("host", n).unwrap_err();
            assert!(e.why.contains(why), "{n:?}: {e}");
            assert!(e.to_string().starts_with("invalid host name"), "{e}");
        }
        let long = "a".repeat(200);
        let e = validate("VM", &long).unwrap_err();
        assert_eq!(e.why, "it is too long");
        assert!(e.to_string().len() < 200, "the message stays short: {e}");
    }

    #[test]
    fn name_new_keeps_the_text() {
        let n = Name::new("VM", "vm1").unwrap();
        assert_eq!(n.as_str(), "vm1");
        assert_eq!(n.to_string(), "vm1");
        assert!(Name::new("VM", "VM1").is_err());
    }
}
