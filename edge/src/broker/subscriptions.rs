//! The subscription index: a trie over topic levels, so that routing a message costs the
//! depth of its topic rather than the number of subscriptions.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use ferry_protocol::mqtt::SubscriptionOptions;
use ferry_protocol::topic::TopicFilter;

/// One subscription of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) client_id: Arc<str>,
    /// For a shared subscription, its full filter (`$share/{group}/{filter}`): the group
    /// that one member of receives each message.
    pub(crate) shared_group: Option<Arc<str>>,
    pub(crate) options: SubscriptionOptions,
    pub(crate) id: Option<NonZeroU32>,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Subscriptions whose filter ends at this node.
    here: Vec<Entry>,
    /// Subscriptions whose filter ends with `#` below this node.
    hash: Vec<Entry>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.hash.is_empty()
    }
}

/// Every subscription of every session, by filter.
#[derive(Debug, Default)]
pub(crate) struct SubscriptionTree {
    root: Node,
    len: usize,
}

impl SubscriptionTree {
    /// Adds or replaces the subscription of `entry.client_id` to `filter`. Returns true if it
    /// replaced one (MQTT-3.8.4-3: a new subscription to the same filter replaces the old).
    pub(crate) fn insert(&mut self, filter: &TopicFilter, entry: Entry) -> bool {
        let (levels, hash) = split(filter.filter());
        let mut node = &mut self.root;
        for level in levels {
            node = node.children.entry(level.into()).or_default();
        }
        let list = if hash { &mut node.hash } else { &mut node.here };
        if let Some(existing) = list
            .iter_mut()
            .find(|e| e.client_id == entry.client_id && e.shared_group == entry.shared_group)
        {
            *existing = entry;
            return true;
        }
        list.push(entry);
        self.len += 1;
        false
    }

    /// Removes the subscription of `client_id` to `filter`; true if there was one.
    pub(crate) fn remove(&mut self, filter: &TopicFilter, client_id: &str) -> bool {
        let (levels, hash) = split(filter.filter());
        let share = filter.is_shared().then(|| filter.as_str());
        let removed = remove_at(&mut self.root, &levels, hash, client_id, share);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f` with every subscription whose filter matches `topic`.
    pub(crate) fn for_each_match(&self, topic: &str, mut f: impl FnMut(&Entry)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let system = topic.starts_with('$');
        visit(&self.root, &levels, system, true, &mut f);
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// A filter's levels, without a trailing `#`, and whether it had one.
fn split(filter: &str) -> (Vec<&str>, bool) {
    let mut levels: Vec<&str> = filter.split('/').collect();
    let hash = levels.last() == Some(&"#");
    if hash {
        levels.pop();
    }
    (levels, hash)
}

fn remove_at(
    node: &mut Node,
    levels: &[&str],
    hash: bool,
    client_id: &str,
    share: Option<&str>,
) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        let list = if hash { &mut node.hash } else { &mut node.here };
        let before = list.len();
        list.retain(|e| !(&*e.client_id == client_id && e.shared_group.as_deref() == share));
        return list.len() != before;
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove_at(child, rest, hash, client_id, share);
    if child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

/// `at_root`: a topic starting with `$` is not matched by a wildcard in the first level
/// (MQTT-4.7.2-1).
fn visit(node: &Node, levels: &[&str], system: bool, at_root: bool, f: &mut impl FnMut(&Entry)) {
    let wildcards = !(system && at_root);
    if wildcards {
        // `#` matches the parent level too: "a/#" matches "a".
        node.hash.iter().for_each(&mut *f);
    }
    let Some((first, rest)) = levels.split_first() else {
        node.here.iter().for_each(f);
        return;
    };
    if let Some(child) = node.children.get(*first) {
        visit(child, rest, system, false, f);
    }
    if wildcards {
        if let Some(child) = node.children.get("+") {
            visit(child, rest, system, false, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_protocol::mqtt::QoS;
    use ferry_protocol::topic::matches;

    use super::*;

    fn entry(client: &str) -> Entry {
        Entry {
            client_id: client.into(),
            shared_group: None,
            options: SubscriptionOptions::new(QoS::AtLeastOnce),
            id: None,
        }
    }

    fn matching(tree: &SubscriptionTree, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        tree.for_each_match(topic, |e| out.push(e.client_id.to_string()));
        out.sort();
        out
    }

    /// The trie agrees with the reference matcher of `ferry-protocol` on every pair.
    #[test]
    fn agrees_with_the_reference_matcher() {
        let filters = [
            "#", "+", "a", "a/#", "a/+", "a/b", "a/+/c", "+/b/#", "/+", "+/", "a//c", "$SYS/#",
            "$SYS/+", "+/+/+", "a/b/c/#",
        ];
        let topics = [
            "a", "a/b", "a/b/c", "a/x/c", "/a", "a/", "a//c", "$SYS/x", "$SYS", "b/b/b", "a/b/c/d",
            "x",
        ];
        let mut tree = SubscriptionTree::default();
        for f in filters {
            tree.insert(&TopicFilter::new(f).expect("valid"), entry(f));
        }
        for t in topics {
            let mut expected: Vec<String> = filters
                .iter()
                .filter(|f| matches(f, t))
                .map(|f| f.to_string())
                .collect();
            expected.sort();
            assert_eq!(matching(&tree, t), expected, "topic {t}");
        }
    }

    #[test]
    fn insert_replaces_and_remove_prunes() {
        let mut tree = SubscriptionTree::default();
        let f = TopicFilter::new("a/+/c").expect("valid");
        assert!(!tree.insert(&f, entry("c1")));
        assert!(
            tree.insert(&f, entry("c1")),
            "same client, same filter: replaced"
        );
        assert!(!tree.insert(&f, entry("c2")));
        assert_eq!(tree.len(), 2);
        assert!(tree.remove(&f, "c1"));
        assert!(!tree.remove(&f, "c1"));
        assert_eq!(matching(&tree, "a/b/c"), ["c2"]);
        assert!(tree.remove(&f, "c2"));
        assert!(tree.root.is_empty(), "empty branches are pruned");
    }

    #[test]
    fn shared_and_plain_subscriptions_of_one_client_coexist() {
        let mut tree = SubscriptionTree::default();
        let plain = TopicFilter::new("a/b").expect("valid");
        let shared = TopicFilter::new("$share/g/a/b").expect("valid");
        tree.insert(&plain, entry("c1"));
        let mut e = entry("c1");
        e.shared_group = Some("$share/g/a/b".into());
        tree.insert(&shared, e);
        assert_eq!(matching(&tree, "a/b").len(), 2);
        assert!(tree.remove(&shared, "c1"));
        assert_eq!(matching(&tree, "a/b"), ["c1"]);
    }
}
