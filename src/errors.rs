//! One line for an error and its causes, as the binary and the daemons print them.

/// `error: cause: cause …`. A cause whose text begins with the link before it (a
/// daemon's answer naming the host its context named: "host silo104" and "host
/// silo104 is in maintenance mode …") replaces that link, so nothing is said twice.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut last = msg.clone();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if text.starts_with(&last) {
            msg.truncate(msg.len() - last.len());
        } else {
            msg.push_str(": ");
        }
        msg.push_str(&text);
        last = text;
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug, thiserror::Error)]
    #[error("{what}")]
    struct E {
        what: &'static str,
        #[source]
        source: Option<Box<E>>,
    }

    fn e(what: &'static str, source: Option<E>) -> E {
        E {
            what,
            source: source.map(Box::new),
        }
    }

    #[test]
    fn causes_follow_with_colons() {
        let err = e(
            "migrate vm1",
            Some(e("host a", Some(e("connection refused", None)))),
        );
        assert_eq!(chain(&err), "migrate vm1: host a: connection refused");
    }

    #[test]
    fn a_cause_that_repeats_its_context_replaces_it() {
        let err = e("host a", Some(e("host a is in maintenance mode", None)));
        assert_eq!(chain(&err), "host a is in maintenance mode");
        let err = e(
            "move",
            Some(e("host a", Some(e("host a has no room", None)))),
        );
        assert_eq!(chain(&err), "move: host a has no room");
    }
}
