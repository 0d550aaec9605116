//! Shelving an alarm on the alarm book's own clock: escalation steps wait while it
//! is shelved and go out when the shelf ends (by itself or unshelved), never after
//! an acknowledge; shelve, unshelve and an operator's clear are transitions with
//! who did them.
use relay_config::plugins::{NotifyConfig, RouteConfig, Severity, StepConfig};
use relay_plugins::alarm::AlarmBook;
use relay_plugins::{Effect, Transition};

fn book() -> AlarmBook {
    let notify = NotifyConfig {
        route: vec![RouteConfig {
            name: "on-call".into(),
            chain: vec![
                StepConfig {
                    channel: "log".into(),
                    target: "first".into(),
                    after_s: 0.0,
                },
                StepConfig {
                    channel: "log".into(),
                    target: "second".into(),
                    after_s: 10.0,
                },
            ],
            notify_clear: false,
            ..RouteConfig::default()
        }],
        ..NotifyConfig::default()
    };
    AlarmBook::new(&notify, 100)
}

/// Targets notified, and transitions with who, in order.
fn split(fx: Vec<Effect>) -> (Vec<String>, Vec<(Transition, Option<String>)>) {
    let mut jobs = Vec::new();
    let mut tr = Vec::new();
    for e in fx {
        match e {
            Effect::Notify(j) => jobs.push(j.target),
            Effect::Alarm(a) => tr.push((a.transition, a.by)),
            _ => {}
        }
    }
    (jobs, tr)
}

#[test]
fn a_shelf_holds_the_chain_until_it_ends_by_itself() {
    let mut b = book();
    b.raise(0, "p/hot", Severity::Major, "hot").unwrap();
    let v = b.shelve(1_000, "p/hot", "Ada", 30_000).unwrap();
    assert_eq!(v.shelved_until_ms, Some(31_000));
    assert_eq!(v.shelved_by.as_deref(), Some("Ada"));
    let (jobs, tr) = split(b.take_effects());
    assert_eq!(jobs, ["first"], "the first step went out at the raise");
    assert_eq!(
        tr,
        [
            (Transition::Raised, None),
            (Transition::Shelved, Some("Ada".into()))
        ]
    );
    // The second step is due at 10 s but the shelf holds it; the clock wakes at its end.
    b.poll(10_000);
    b.poll(30_999);
    assert!(split(b.take_effects()).0.is_empty());
    assert_eq!(b.next_due(20_000), Some(31_000));
    b.poll(31_000);
    assert_eq!(split(b.take_effects()).0, ["second"]);
}

#[test]
fn unshelving_sends_what_fell_due_and_an_acknowledge_still_stops_it() {
    let mut b = book();
    b.raise(0, "a/hot", Severity::Major, "hot").unwrap();
    b.raise(0, "b/hot", Severity::Major, "hot").unwrap();
    b.shelve(0, "a/hot", "Ada", 3_600_000).unwrap();
    b.shelve(0, "b/hot", "Ada", 3_600_000).unwrap();
    b.take_effects();
    b.poll(20_000);
    assert!(split(b.take_effects()).0.is_empty());
    // a: unshelved (for_ms 0): its due step goes out at the next poll.
    let v = b.shelve(21_000, "a/hot", "Bob", 0).unwrap();
    assert_eq!(v.shelved_until_ms, None);
    // b: acknowledged while shelved: nothing goes out, ever.
    b.ack(21_000, "b/hot", "Bob").unwrap();
    b.poll(21_000);
    b.poll(3_700_000);
    let (jobs, tr) = split(b.take_effects());
    assert_eq!(jobs, ["second"]);
    assert!(tr.contains(&(Transition::Unshelved, Some("Bob".into()))));
    // An operator's clear names the operator.
    assert!(b.clear_as(3_700_000, "a/hot", Some("Cy")));
    let (_, tr) = split(b.take_effects());
    assert_eq!(tr, [(Transition::Cleared, Some("Cy".into()))]);
    assert!(
        b.shelve(0, "a/hot", "Ada", 1_000).is_err(),
        "not active any more"
    );
}
