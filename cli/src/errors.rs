//! How an error and its causes are told to a user in one line.
//!
//! sonde's error types say what went wrong, where and what to do in their own `Display`,
//! usually including their cause's message, and still expose that cause as
//! [`Error::source`]. Errors of other crates (tonic's transport errors, hyper's) say little
//! at the top ("transport error") and the rest in their causes. [`describe`] joins the
//! chain with `: ` and leaves out a cause whose message the text already holds, so that
//! both kinds read in full and neither says the same thing twice.

use std::error::Error;
use std::io::ErrorKind;

/// What either side of a stream says when its connection died under it: the HTTP/2
/// layers call that "error reading a body from connection", which tells nobody why.
pub const CONNECTION_LOST: &str =
    "connection lost without a status: peer gone, network cut, or keepalive unanswered";

/// True when `e` (or a cause of it) is a connection that ended under a stream without
/// either side ending the stream: the peer closed or reset the connection, or an
/// HTTP/2 keepalive went unanswered.
pub fn connection_lost(e: &(dyn Error + 'static)) -> bool {
    let lost_io = |kind: ErrorKind| {
        matches!(
            kind,
            ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::TimedOut
        )
    };
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            // An I/O error wrapping another one shows it as its inner error, not as
            // its source.
            if lost_io(io.kind()) || io.get_ref().is_some_and(|inner| connection_lost(inner)) {
                return true;
            }
        }
        // h2 keeps the I/O error it failed on without exposing it as a source.
        if let Some(h2) = c.downcast_ref::<h2::Error>()
            && h2.get_io().is_some_and(|io| lost_io(io.kind()))
        {
            return true;
        }
        if let Some(hyper) = c.downcast_ref::<hyper::Error>()
            && (hyper.is_timeout() || hyper.is_incomplete_message())
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// `e` and each of its causes, joined with `: `, without repeating a message that an
/// error's own text already includes.
pub fn describe(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !message.is_empty() && !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;

    #[derive(Debug)]
    struct Layer {
        text: String,
        cause: Option<Box<Layer>>,
    }

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.text)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.cause.as_deref().map(|c| c as &(dyn Error + 'static))
        }
    }

    fn layers(texts: &[&str]) -> Layer {
        texts
            .iter()
            .rev()
            .fold(None, |cause, text| {
                Some(Layer {
                    text: text.to_string(),
                    cause: cause.map(Box::new),
                })
            })
            .unwrap()
    }

    #[test]
    fn terse_errors_are_told_with_their_causes() {
        let e = layers(&[
            "transport error",
            "tcp connect error",
            "Connection refused (os error 111)",
        ]);
        assert_eq!(
            describe(&e),
            "transport error: tcp connect error: Connection refused (os error 111)"
        );
    }

    #[test]
    fn a_dead_connection_is_told_apart_from_other_errors() {
        let broken = std::io::Error::new(ErrorKind::BrokenPipe, "stream closed");
        let wrapped = std::io::Error::other(broken);
        assert!(connection_lost(&wrapped));
        let refused = std::io::Error::from(ErrorKind::ConnectionRefused);
        assert!(!connection_lost(&refused));
        let protocol: h2::Error = h2::Reason::PROTOCOL_ERROR.into();
        assert!(!connection_lost(&protocol));
    }

    #[test]
    fn a_cause_the_message_already_holds_is_not_repeated() {
        let e = layers(&[
            "cannot read ca_file /x: No such file or directory (os error 2)",
            "No such file or directory (os error 2)",
        ]);
        assert_eq!(
            describe(&e),
            "cannot read ca_file /x: No such file or directory (os error 2)"
        );
    }
}
