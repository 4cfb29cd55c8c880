//! The GPIO source (`[[field.gpio]]`): lines of a GPIO chip, through the Linux GPIO
//! character device (`gpiocdev`, which works on every board with a GPIO chip). Inputs are
//! watched for edges, debounced, and each change published as an event; outputs are set by
//! commands on `<prefix>/<name>/set/<line>`.
//!
//! The chip sits behind [`Chip`] and [`Lines`]: [`Cdev`] is the real one (a thread per
//! source waits for its edges); the tests drive a fake. Debouncing is ours ([`Debounce`], sans-IO), not the kernel's, so it works the same
//! on kernels and drivers without hardware debounce: an edge starts a quiet period of
//! `debounce_ms`; the line's level is taken when no other edge came within it, and published
//! only if it differs from the last level taken (a bounce that returns is nothing). The
//! event's time is that of the first edge of the run.
//!
//! A chip that cannot be opened, or whose lines fail, is reported down and requested again
//! every `reopen_ms`.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_protocol::mqtt::{Properties, Publish};
use ferry_protocol::topic::TopicName;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::stats::now_ms;
use super::{until_stopped, Ctx, Outcome};

/// One `[[field.gpio]]` table: lines of one chip.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioConfig {
    /// The source's name: one topic level, unique among the sources.
    pub name: String,
    /// The chip's character device. Default `/dev/gpiochip0`.
    #[serde(default = "default_chip")]
    pub chip: PathBuf,
    /// The lines it uses.
    #[serde(default)]
    pub lines: Vec<LineConfig>,
    /// How long to wait before requesting the lines again after a failure. Default 1000.
    #[serde(default = "default_reopen")]
    pub reopen_ms: u64,
    /// Where events go: a template with `{prefix}` and `{name}`, then `/<line>`. Default
    /// `{prefix}/{name}`.
    pub topic: Option<String>,
    /// 0 or 1. Default 1.
    #[serde(default = "super::one")]
    pub qos: u8,
    /// Publish events retained (the last level of each line stays on its topic). Default
    /// false.
    #[serde(default)]
    pub retain: bool,
    /// The most messages a second; more are dropped and counted. Default 20,000.
    #[serde(default = "super::default_rate")]
    pub max_per_sec: u32,
}

/// One line of a chip.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineConfig {
    /// The line's name: a topic level.
    pub name: String,
    /// Its offset on the chip (`gpioinfo` lists them).
    pub offset: u32,
    /// `input` (the default) or `output`.
    #[serde(default)]
    pub direction: Direction,
    /// For inputs, which changes are published: `both` (the default), `rising` (to active)
    /// or `falling` (to inactive).
    #[serde(default)]
    pub edge: EdgeFilter,
    /// For inputs: how long the line must stay quiet after an edge before its level is
    /// taken. Default 10; 0 takes every edge.
    #[serde(default = "default_debounce")]
    pub debounce_ms: u64,
    /// For inputs: `as_is` (the default), `pull_up`, `pull_down` or `disabled`.
    #[serde(default)]
    pub bias: Bias,
    /// Active is the low level (a button to ground with a pull-up). Default false.
    #[serde(default)]
    pub active_low: bool,
    /// For outputs: the level set when the line is requested. Default false (inactive).
    #[serde(default)]
    pub initial: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Input,
    Output,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeFilter {
    #[default]
    Both,
    Rising,
    Falling,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    #[default]
    AsIs,
    PullUp,
    PullDown,
    Disabled,
}

fn default_chip() -> PathBuf {
    "/dev/gpiochip0".into()
}
fn default_reopen() -> u64 {
    1000
}
fn default_debounce() -> u64 {
    10
}

impl GpioConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.lines.is_empty() {
            return Err("has no lines".into());
        }
        if self.reopen_ms == 0 {
            return Err("reopen_ms must be at least 1".into());
        }
        let mut names = std::collections::HashSet::new();
        let mut offsets = std::collections::HashSet::new();
        for l in &self.lines {
            super::check_level("a line's name", &l.name)?;
            if !names.insert(&l.name) {
                return Err(format!("two lines are named {:?}", l.name));
            }
            if !offsets.insert(l.offset) {
                return Err(format!("offset {} is used twice", l.offset));
            }
        }
        Ok(())
    }
}

/// The requested lines of a chip, as the source uses them.
pub trait Lines: Send + 'static {
    /// Waits for the next edge of an input: its offset, and whether the line is now active.
    fn next_edge(&mut self) -> impl Future<Output = io::Result<(u32, bool)>> + Send;
    /// Whether a line is active now.
    fn level(&mut self, offset: u32) -> io::Result<bool>;
    /// Sets an output.
    fn set(&mut self, offset: u32, active: bool) -> io::Result<()>;
}

/// Where a source's lines come from.
pub trait Chip: Send + Sync + 'static {
    type Lines: Lines;
    /// Requests every line of `config`, inputs with edge detection on both edges.
    fn request(&self, config: &GpioConfig) -> io::Result<Self::Lines>;
}

/// The Linux GPIO character device (uAPI v2), through gpiocdev.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cdev;

/// Lines requested from a character device. A thread of its own waits for their edges
/// (gpiocdev's reads block; edges are rare) and hands them over; it ends with the lines.
#[derive(Debug)]
pub struct CdevLines {
    request: Arc<gpiocdev::Request>,
    edges: tokio::sync::mpsc::Receiver<io::Result<(u32, bool)>>,
    done: Arc<std::sync::atomic::AtomicBool>,
}

/// How often the edge thread looks whether its lines were let go of.
const EDGE_WAIT: Duration = Duration::from_millis(200);

impl Chip for Cdev {
    type Lines = CdevLines;

    fn request(&self, config: &GpioConfig) -> io::Result<CdevLines> {
        use gpiocdev::line::{Bias as B, EdgeDetection, Value as V};
        let mut b = gpiocdev::Request::builder();
        b.on_chip(&config.chip)
            .with_consumer(format!("ferry-edge:{}", config.name));
        for l in &config.lines {
            b.with_line(l.offset);
            if l.active_low {
                b.as_active_low();
            }
            match l.direction {
                Direction::Input => {
                    b.as_input()
                        .with_edge_detection(EdgeDetection::BothEdges)
                        .with_bias(match l.bias {
                            Bias::AsIs => None,
                            Bias::PullUp => Some(B::PullUp),
                            Bias::PullDown => Some(B::PullDown),
                            Bias::Disabled => Some(B::Disabled),
                        });
                }
                Direction::Output => {
                    b.as_output(if l.initial { V::Active } else { V::Inactive });
                }
            }
        }
        let request = Arc::new(b.request().map_err(io::Error::other)?);
        let (tx, edges) = tokio::sync::mpsc::channel(256);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, stop) = (request.clone(), done.clone());
        std::thread::Builder::new()
            .name(format!("ferry-gpio-{}", config.name))
            .spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let edge = match r.wait_edge_event(EDGE_WAIT) {
                        Ok(false) => continue,
                        Ok(true) => r
                            .read_edge_event()
                            .map(|e| (e.offset, e.kind == gpiocdev::line::EdgeKind::Rising)),
                        Err(e) => Err(e),
                    };
                    let failed = edge.is_err();
                    if tx.blocking_send(edge.map_err(io::Error::other)).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(CdevLines {
            request,
            edges,
            done,
        })
    }
}

impl Drop for CdevLines {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Lines for CdevLines {
    async fn next_edge(&mut self) -> io::Result<(u32, bool)> {
        match self.edges.recv().await {
            Some(edge) => edge,
            None => Err(io::Error::other("the edge thread ended")),
        }
    }

    fn level(&mut self, offset: u32) -> io::Result<bool> {
        let value = self.request.value(offset).map_err(io::Error::other)?;
        Ok(value == gpiocdev::line::Value::Active)
    }

    fn set(&mut self, offset: u32, active: bool) -> io::Result<()> {
        use gpiocdev::line::Value as V;
        self.request
            .set_value(offset, if active { V::Active } else { V::Inactive })
            .map_err(io::Error::other)
    }
}

/// One input's debouncing (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Debounce {
    period: Duration,
    level: bool,
    /// The level the last edge left, when the quiet period ends, and the first edge's time
    /// (ms since the epoch).
    pending: Option<(bool, Instant, u64)>,
}

impl Debounce {
    /// Starts from `level`, the line's level when it was requested.
    pub fn new(level: bool, period: Duration) -> Self {
        Self {
            period,
            level,
            pending: None,
        }
    }

    /// An edge read at `now` (`ts`: the same instant, ms since the epoch): the line is now
    /// `active`. Returns the change to publish when there is no quiet period to wait for.
    pub fn edge(&mut self, active: bool, now: Instant, ts: u64) -> Option<(bool, u64)> {
        if self.period.is_zero() {
            return self.take(active, ts);
        }
        let first = self.pending.map_or(ts, |(_, _, first)| first);
        self.pending = Some((active, now + self.period, first));
        None
    }

    /// When the quiet period ends, if one is running.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.map(|(_, at, _)| at)
    }

    /// The change to publish, if the quiet period has ended by `now` and the level moved.
    pub fn expire(&mut self, now: Instant) -> Option<(bool, u64)> {
        match self.pending {
            Some((active, at, ts)) if now >= at => {
                self.pending = None;
                self.take(active, ts)
            }
            _ => None,
        }
    }

    fn take(&mut self, active: bool, ts: u64) -> Option<(bool, u64)> {
        if active == self.level {
            return None;
        }
        self.level = active;
        Some((active, ts))
    }
}

/// What woke the source.
enum Step {
    Edge(io::Result<(u32, bool)>),
    Quiet,
    Command(Option<Publish>),
    Stop,
}

/// The source's task: request the lines, publish their levels and changes, set outputs,
/// request them again after a failure, until stopped.
pub(crate) async fn run<C: Chip>(mut ctx: Ctx, config: GpioConfig, chip: Arc<C>) {
    let writable = config
        .lines
        .iter()
        .any(|l| l.direction == Direction::Output);
    let Some((client, mut commands)) = ctx.connect(writable).await else {
        return;
    };
    let topics = config
        .lines
        .iter()
        .map(|l| ctx.config.topic(&ctx.publishing, &ctx.name, Some(&l.name)))
        .collect::<Result<Vec<TopicName>, _>>();
    let topics = match topics {
        Ok(t) => t,
        Err(e) => return warn!(source = %ctx.name, error = %e, "field source not started"),
    };
    let mut was_down = false;
    while !ctx.stopping() {
        let started = Instant::now();
        let mut lines = match chip.request(&config) {
            Ok(lines) => lines,
            Err(e) => {
                let why = format!("cannot request the lines of {}: {e}", config.chip.display());
                if !ctx
                    .down_then_wait(&client, &mut was_down, why, config.reopen_ms)
                    .await
                {
                    return;
                }
                continue;
            }
        };
        info!(source = %ctx.name, chip = %config.chip.display(), lines = config.lines.len(), "GPIO lines requested");
        let why = serve(
            &mut ctx,
            &config,
            &client,
            &topics,
            &mut lines,
            &mut commands,
            started,
        )
        .await;
        let Some(why) = why else { return };
        was_down = false;
        if !ctx
            .down_then_wait(&client, &mut was_down, why, config.reopen_ms)
            .await
        {
            return;
        }
    }
}

/// Serves requested lines: the inputs' levels first, then their changes and the commands.
/// `None` when the source is to stop; else why the lines failed.
async fn serve<L: Lines>(
    ctx: &mut Ctx,
    config: &GpioConfig,
    client: &super::client::Client,
    topics: &[TopicName],
    lines: &mut L,
    commands: &mut tokio::sync::mpsc::Receiver<super::client::Command>,
    started: Instant,
) -> Option<String> {
    let mut stop = ctx.stop.clone();
    let mut debounce: Vec<Option<Debounce>> = Vec::with_capacity(config.lines.len());
    for (i, l) in config.lines.iter().enumerate() {
        if l.direction == Direction::Output {
            debounce.push(None);
            continue;
        }
        let level = match lines.level(l.offset) {
            Ok(level) => level,
            Err(e) => return Some(format!("cannot read line {:?}: {e}", l.name)),
        };
        debounce.push(Some(Debounce::new(
            level,
            Duration::from_millis(l.debounce_ms),
        )));
        publish(
            ctx,
            client,
            &topics[i],
            json!({ "value": level, "ts": now_ms() }),
        )
        .await;
    }
    ctx.stats.read_ok(started.elapsed().as_micros() as u64);
    ctx.status(client, true, None).await;
    loop {
        let quiet = debounce
            .iter()
            .filter_map(|d| d.as_ref().and_then(Debounce::deadline))
            .min();
        let step = tokio::select! {
            edge = lines.next_edge() => Step::Edge(edge),
            _ = sleep_until(quiet), if quiet.is_some() => Step::Quiet,
            cmd = commands.recv() => Step::Command(cmd),
            _ = until_stopped(&mut stop) => Step::Stop,
        };
        let now = Instant::now();
        let mut changes = Vec::new();
        match step {
            Step::Stop | Step::Command(None) => return None,
            Step::Edge(Err(e)) => return Some(format!("reading edges failed: {e}")),
            Step::Edge(Ok((offset, active))) => {
                let Some(i) = config.lines.iter().position(|l| l.offset == offset) else {
                    continue;
                };
                ctx.stats.read_ok(0);
                if let Some(change) = debounce[i]
                    .as_mut()
                    .and_then(|d| d.edge(active, now, now_ms()))
                {
                    changes.push((i, change));
                }
            }
            Step::Quiet => {
                for (i, d) in debounce.iter_mut().enumerate() {
                    if let Some(change) = d.as_mut().and_then(|d| d.expire(now)) {
                        changes.push((i, change));
                    }
                }
            }
            Step::Command(Some(cmd)) => {
                if let Err(why) = command(ctx, config, client, topics, lines, &cmd).await {
                    return Some(why);
                }
            }
        }
        for (i, (active, ts)) in changes {
            let wanted = match config.lines[i].edge {
                EdgeFilter::Both => true,
                EdgeFilter::Rising => active,
                EdgeFilter::Falling => !active,
            };
            if wanted {
                let edge = if active { "rising" } else { "falling" };
                let event = json!({ "value": active, "edge": edge, "ts": ts });
                publish(ctx, client, &topics[i], event).await;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

async fn publish(ctx: &mut Ctx, client: &super::client::Client, topic: &TopicName, body: Value) {
    if !ctx.admit() {
        return;
    }
    let mut props = Properties::default();
    props.content_type = Some("application/json".into());
    let p = ctx.reading(topic.clone(), Bytes::from(body.to_string()), props);
    let _ = client.publish(p).await;
}

/// A command: set one output, answer, and publish its new level. Err when the chip failed.
async fn command<L: Lines>(
    ctx: &mut Ctx,
    config: &GpioConfig,
    client: &super::client::Client,
    topics: &[TopicName],
    lines: &mut L,
    cmd: &Publish,
) -> Result<(), String> {
    let name = cmd
        .topic
        .as_str()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_owned();
    let value = super::modbus::command_value(&cmd.payload);
    let line = config.lines.iter().position(|l| l.name == name);
    let target = match (line, &value) {
        (None, _) => Err(format!("no line named {name:?}")),
        (Some(i), _) if config.lines[i].direction != Direction::Output => {
            Err(format!("line {name:?} is not an output"))
        }
        (Some(i), Value::Bool(b)) => Ok((i, *b)),
        (Some(i), Value::Number(n)) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
            Ok((i, n.as_u64() == Some(1)))
        }
        (Some(_), _) => Err(format!("line {name:?} needs true or false")),
    };
    let mut failed = None;
    let outcome = match target {
        Err(why) => Outcome::Refused(why),
        Ok((i, active)) => match lines.set(config.lines[i].offset, active) {
            Ok(()) => {
                let level = json!({ "value": active, "ts": now_ms() });
                publish(ctx, client, &topics[i], level).await;
                Outcome::Done
            }
            Err(e) => {
                let why = format!("setting line {name:?} failed: {e}");
                failed = Some(why.clone());
                Outcome::Failed(why)
            }
        },
    };
    ctx.answer(client, cmd, &name, &value, outcome).await;
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tokio::sync::mpsc;

    #[test]
    fn a_bouncing_edge_is_one_change_at_the_first_edges_time_and_a_bounce_back_is_none() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = Debounce::new(false, Duration::from_millis(10));
        assert_eq!(d.edge(true, ms(0), 1000), None);
        assert_eq!(d.edge(false, ms(2), 1002), None);
        assert_eq!(d.edge(true, ms(4), 1004), None);
        assert_eq!(d.deadline(), Some(ms(14)));
        assert_eq!(d.expire(ms(13)), None, "still bouncing");
        assert_eq!(d.expire(ms(14)), Some((true, 1000)));
        assert_eq!(d.deadline(), None);
        // Down and back up within the period: the level did not change.
        assert_eq!(d.edge(false, ms(100), 2000), None);
        assert_eq!(d.edge(true, ms(103), 2003), None);
        assert_eq!(d.expire(ms(200)), None);
        // No period: every change at once, a repeated level ignored.
        let mut d = Debounce::new(true, Duration::ZERO);
        assert_eq!(d.edge(false, ms(0), 5), Some((false, 5)));
        assert_eq!(d.edge(false, ms(1), 6), None);
        assert_eq!(d.edge(true, ms(2), 7), Some((true, 7)));
    }

    /// A chip in memory: edges come from the test, levels are a map the test reads, and
    /// each request can be made to fail.
    #[derive(Default)]
    struct Fake {
        levels: Arc<Mutex<HashMap<u32, bool>>>,
        edges: Mutex<Vec<mpsc::UnboundedReceiver<(u32, bool)>>>,
        requests: std::sync::atomic::AtomicU32,
    }

    struct FakeLines {
        levels: Arc<Mutex<HashMap<u32, bool>>>,
        edges: mpsc::UnboundedReceiver<(u32, bool)>,
    }

    impl Chip for Fake {
        type Lines = FakeLines;
        fn request(&self, config: &GpioConfig) -> io::Result<FakeLines> {
            self.requests
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let edges = self
                .edges
                .lock()
                .expect("lock")
                .pop()
                .ok_or_else(|| io::Error::other("no such chip"))?;
            let mut levels = self.levels.lock().expect("lock");
            for l in &config.lines {
                if l.direction == Direction::Output {
                    levels.insert(l.offset, l.initial);
                }
            }
            Ok(FakeLines {
                levels: self.levels.clone(),
                edges,
            })
        }
    }

    impl Lines for FakeLines {
        async fn next_edge(&mut self) -> io::Result<(u32, bool)> {
            let (offset, active) = self
                .edges
                .recv()
                .await
                .ok_or_else(|| io::Error::other("chip gone"))?;
            self.levels.lock().expect("lock").insert(offset, active);
            Ok((offset, active))
        }
        fn level(&mut self, offset: u32) -> io::Result<bool> {
            Ok(self
                .levels
                .lock()
                .expect("lock")
                .get(&offset)
                .copied()
                .unwrap_or(false))
        }
        fn set(&mut self, offset: u32, active: bool) -> io::Result<()> {
            self.levels.lock().expect("lock").insert(offset, active);
            Ok(())
        }
    }

    fn line(
        name: &str,
        offset: u32,
        direction: Direction,
        edge: EdgeFilter,
        debounce_ms: u64,
    ) -> LineConfig {
        LineConfig {
            name: name.into(),
            offset,
            direction,
            edge,
            debounce_ms,
            bias: Bias::AsIs,
            active_low: false,
            initial: false,
        }
    }

    /// The next message the watcher got on a topic that ends with `suffix`, as JSON.
    async fn next_on(rx: &mut mpsc::Receiver<Publish>, suffix: &str) -> Value {
        loop {
            let p = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("a message on *{suffix} within 10 s"))
                .expect("the watcher is connected");
            if p.topic.as_str().ends_with(suffix) {
                return serde_json::from_slice(&p.payload).expect("json");
            }
        }
    }

    /// The whole source in a real broker, on a fake chip: the inputs' levels at start, a
    /// debounced change, an edge filter, an output set by a command and answered, a command
    /// refused, and the chip failing and coming back.
    #[tokio::test]
    async fn inputs_are_published_and_outputs_set_and_a_failed_chip_is_requested_again() {
        let dir = std::env::temp_dir().join(format!("ferry-gpio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = crate::config::Config::default();
        config.server.listen = vec!["127.0.0.1:0".parse().expect("addr")];
        config.server.data_dir = dir.clone();
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let server = crate::server::Server::start(config, async {
            let _ = shutdown_rx.await;
        })
        .await
        .expect("the broker starts");

        let fake = Arc::new(Fake::default());
        fake.levels.lock().expect("lock").insert(3, true);
        let (edges_2, rx_2) = mpsc::unbounded_channel();
        let (edges_1, rx_1) = mpsc::unbounded_channel();
        // Popped from the end: the first request gets rx_1, the one after the failure rx_2.
        fake.edges.lock().expect("lock").extend([rx_2, rx_1]);
        let gpio = GpioConfig {
            name: "io".into(),
            chip: "/dev/fake".into(),
            lines: vec![
                line("door", 3, Direction::Input, EdgeFilter::Both, 20),
                line("button", 4, Direction::Input, EdgeFilter::Rising, 0),
                line("relay", 7, Direction::Output, EdgeFilter::Both, 0),
            ],
            reopen_ms: 50,
            topic: None,
            qos: 1,
            retain: false,
            max_per_sec: 1000,
        };
        let field = super::super::FieldConfig {
            gpio: vec![gpio.clone()],
            ..Default::default()
        };
        field.validate().expect("valid");

        let stats = super::super::stats::SourceStats::new("watcher", "test");
        let (watcher, mut seen) =
            super::super::client::Client::connect(&server, "watcher", "watcher", stats)
                .await
                .expect("the watcher connects");
        watcher
            .subscribe(vec![
                ferry_protocol::topic::TopicFilter::new("field/#").expect("filter"),
                ferry_protocol::topic::TopicFilter::new("answers/#").expect("filter"),
            ])
            .await
            .expect("subscribed");

        let (stop, stopped) = tokio::sync::watch::channel(false);
        let ctx = Ctx::new(
            &server,
            &Arc::new(field),
            "io",
            &gpio.publishing(),
            super::super::stats::SourceStats::new("io", "gpio"),
            &stopped,
        );
        tokio::spawn(run(ctx, gpio, fake.clone()));

        assert_eq!(next_on(&mut seen, "/door").await["value"], json!(true));
        assert_eq!(next_on(&mut seen, "/button").await["value"], json!(false));
        assert_eq!(next_on(&mut seen, "/status").await["state"], json!("up"));
        // The door bounces open: one event, falling.
        for active in [false, true, false] {
            edges_1.send((3, active)).expect("send");
        }
        let door = next_on(&mut seen, "/door").await;
        assert_eq!(door["value"], json!(false));
        assert_eq!(door["edge"], json!("falling"));
        // The button publishes rising edges only: press, release, press is two events.
        for active in [true, false, true] {
            edges_1.send((4, active)).expect("send");
        }
        let press = next_on(&mut seen, "/button").await;
        assert_eq!(
            (press["value"].clone(), press["edge"].clone()),
            (json!(true), json!("rising"))
        );
        assert_eq!(next_on(&mut seen, "/button").await["edge"], json!("rising"));

        // A command with a response topic sets the relay.
        let mut cmd = Publish::new(
            TopicName::new("field/io/set/relay".to_owned()).expect("topic"),
            Bytes::from_static(b"on"),
        );
        cmd.qos = ferry_protocol::mqtt::QoS::AtLeastOnce;
        cmd.properties.response_topic =
            Some(TopicName::new("answers/1".to_owned()).expect("topic"));
        watcher.publish(cmd).await.expect("published");
        let answer = next_on(&mut seen, "answers/1").await;
        assert_eq!(answer["result"], json!("done"), "{answer}");
        assert_eq!(fake.levels.lock().expect("lock").get(&7), Some(&true));
        // An input cannot be set: refused, on the reply topic.
        let mut cmd = Publish::new(
            TopicName::new("field/io/set/door".to_owned()).expect("topic"),
            Bytes::from_static(b"true"),
        );
        cmd.qos = ferry_protocol::mqtt::QoS::AtLeastOnce;
        watcher.publish(cmd).await.expect("published");
        let answer = next_on(&mut seen, "/reply/door").await;
        assert_eq!(answer["result"], json!("refused"), "{answer}");

        // The chip goes away: down, requested again, up, its levels published again.
        drop(edges_1);
        assert_eq!(next_on(&mut seen, "/status").await["state"], json!("down"));
        assert_eq!(
            next_on(&mut seen, "/door").await["value"],
            json!(false),
            "the level at the new request"
        );
        assert_eq!(next_on(&mut seen, "/status").await["state"], json!("up"));
        assert_eq!(fake.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
        edges_2.send((3, true)).expect("send");
        let door = next_on(&mut seen, "/door").await;
        assert_eq!(
            (door["value"].clone(), door["edge"].clone()),
            (json!(true), json!("rising"))
        );

        let _ = stop.send(true);
        let _ = shutdown.send(());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
