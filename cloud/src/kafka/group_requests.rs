//! The consumer group requests of the Kafka front, on [`super::groups::Groups`] and the
//! metadata's cursors (one cursor per group, stream and partition: the committed offset).

use std::time::Duration;

use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    BrokerId, DescribeGroupsRequest, DescribeGroupsResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, GroupId, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, ListGroupsResponse,
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse,
    SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::code::{COORDINATOR_NOT_AVAILABLE, NONE, NOT_COORDINATOR, UNKNOWN_TOPIC_OR_PARTITION};
use super::KafkaFront;
use crate::meta::Command;

fn s(text: impl Into<String>) -> StrBytes {
    StrBytes::from_string(text.into())
}

impl KafkaFront {
    /// This node coordinates every group. v0-3 answer for one key in the top-level fields,
    /// v4+ a list of coordinators (a field of the other form must stay unset).
    pub(super) fn find_coordinator(
        &self,
        r: FindCoordinatorRequest,
        version: i16,
    ) -> FindCoordinatorResponse {
        let (host, port) = self.advertised();
        // The group's coordinator in a cluster, else this node (broker 0).
        let of = |group: &str| {
            self.cluster
                .coordinator(group)
                .map_or((0, host.clone(), port), |b| (b.id, b.host, b.port))
        };
        if version < 4 {
            let (id, host, port) = of(r.key.as_str());
            return FindCoordinatorResponse::default()
                .with_node_id(BrokerId(id))
                .with_host(s(host))
                .with_port(port);
        }
        FindCoordinatorResponse::default().with_coordinators(
            r.coordinator_keys
                .into_iter()
                .map(|key| {
                    let (id, host, port) = of(key.as_str());
                    Coordinator::default()
                        .with_key(key)
                        .with_node_id(BrokerId(id))
                        .with_host(s(host))
                        .with_port(port)
                })
                .collect(),
        )
    }

    pub(super) async fn join_group(
        &self,
        r: JoinGroupRequest,
        version: i16,
        client_id: &str,
    ) -> JoinGroupResponse {
        let protocols = r
            .protocols
            .into_iter()
            .map(|p| (p.name.as_str().to_owned(), p.metadata))
            .collect();
        let session = Duration::from_millis(r.session_timeout_ms.max(1) as u64);
        // v0 has no rebalance timeout: it is the session timeout.
        let rebalance = if version >= 1 {
            Duration::from_millis(r.rebalance_timeout_ms.max(1) as u64)
        } else {
            session
        };
        if !self.cluster.coordinates(r.group_id.as_str()) {
            return JoinGroupResponse::default()
                .with_error_code(NOT_COORDINATOR)
                .with_generation_id(-1);
        }
        let joined = self
            .groups
            .join(
                r.group_id.as_str(),
                r.member_id.as_str(),
                client_id,
                r.protocol_type.as_str(),
                protocols,
                session,
                rebalance,
                version >= 4,
            )
            .await;
        JoinGroupResponse::default()
            .with_error_code(joined.error_code)
            .with_generation_id(joined.generation)
            .with_protocol_type(Some(s(joined.protocol_type)))
            .with_protocol_name(joined.protocol.map(s))
            .with_leader(s(joined.leader))
            .with_member_id(s(joined.member_id))
            .with_members(
                joined
                    .members
                    .into_iter()
                    .map(|(id, metadata)| {
                        JoinGroupResponseMember::default()
                            .with_member_id(s(id))
                            .with_metadata(metadata)
                    })
                    .collect(),
            )
    }

    pub(super) async fn sync_group(&self, r: SyncGroupRequest) -> SyncGroupResponse {
        if !self.cluster.coordinates(r.group_id.as_str()) {
            return SyncGroupResponse::default().with_error_code(NOT_COORDINATOR);
        }
        let assignments = r
            .assignments
            .into_iter()
            .map(|a| (a.member_id.as_str().to_owned(), a.assignment))
            .collect();
        let (error_code, assignment) = self
            .groups
            .sync(
                r.group_id.as_str(),
                r.generation_id,
                r.member_id.as_str(),
                assignments,
            )
            .await;
        SyncGroupResponse::default()
            .with_error_code(error_code)
            .with_protocol_type(r.protocol_type)
            .with_protocol_name(r.protocol_name)
            .with_assignment(assignment)
    }

    pub(super) fn heartbeat(&self, r: HeartbeatRequest) -> HeartbeatResponse {
        if !self.cluster.coordinates(r.group_id.as_str()) {
            return HeartbeatResponse::default().with_error_code(NOT_COORDINATOR);
        }
        HeartbeatResponse::default().with_error_code(self.groups.heartbeat(
            r.group_id.as_str(),
            r.generation_id,
            r.member_id.as_str(),
        ))
    }

    pub(super) fn leave_group(&self, r: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
        // v0-2 name one member; v3+ a list.
        let ids: Vec<String> = if r.members.is_empty() {
            vec![r.member_id.as_str().to_owned()]
        } else {
            r.members
                .iter()
                .map(|m| m.member_id.as_str().to_owned())
                .collect()
        };
        let codes = if self.cluster.coordinates(r.group_id.as_str()) {
            self.groups.leave(r.group_id.as_str(), &ids)
        } else {
            vec![NOT_COORDINATOR; ids.len()]
        };
        if version < 3 {
            return LeaveGroupResponse::default().with_error_code(codes[0]);
        }
        LeaveGroupResponse::default().with_members(
            ids.into_iter()
                .zip(codes)
                .map(|(id, code)| {
                    MemberResponse::default()
                        .with_member_id(s(id))
                        .with_error_code(code)
                })
                .collect(),
        )
    }

    pub(super) async fn offset_commit(&self, r: OffsetCommitRequest) -> OffsetCommitResponse {
        let group = r.group_id.as_str().to_owned();
        let allowed = if self.cluster.coordinates(&group) {
            self.groups.may_commit(
                &group,
                r.generation_id_or_member_epoch,
                r.member_id.as_str(),
            )
        } else {
            NOT_COORDINATOR
        };
        let streams = self.log.streams();
        let mut commands = Vec::new();
        let mut topics = Vec::new();
        for t in r.topics {
            let stream = streams.iter().find(|s| s.name == t.name.as_str());
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let exists = stream.is_some_and(|s| {
                        usize::try_from(p.partition_index).is_ok_and(|i| i < s.partitions.len())
                    });
                    let code = if allowed != NONE {
                        allowed
                    } else if !exists {
                        UNKNOWN_TOPIC_OR_PARTITION
                    } else {
                        commands.push(Command::CommitCursor {
                            group: group.clone(),
                            stream: t.name.as_str().to_owned(),
                            partition: p.partition_index as u32,
                            offset: p.committed_offset,
                        });
                        NONE
                    };
                    OffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(code)
                })
                .collect::<Vec<_>>();
            topics.push((t.name, partitions));
        }
        let meta = self.meta.clone();
        // Fenced in a cluster: committed only while this node still holds the group's lease.
        let fence = self.cluster.fence(&group);
        let stored =
            tokio::task::spawn_blocking(move || meta.apply_fenced(&commands, fence.as_ref()))
                .await
                .map_or(Err(()), |r| r.map_err(|_| ()));
        let (stored, fenced_out) = match stored {
            Ok(true) => (true, false),
            Ok(false) => (false, true),
            Err(()) => (false, false),
        };
        OffsetCommitResponse::default().with_topics(
            topics
                .into_iter()
                .map(|(name, mut partitions)| {
                    if !stored {
                        let code = if fenced_out {
                            NOT_COORDINATOR
                        } else {
                            COORDINATOR_NOT_AVAILABLE
                        };
                        for p in &mut partitions {
                            if p.error_code == NONE {
                                p.error_code = code;
                            }
                        }
                    }
                    OffsetCommitResponseTopic::default()
                        .with_name(name)
                        .with_partitions(partitions)
                })
                .collect(),
        )
    }

    /// OffsetFetch v1-8: the committed offset of each partition asked for (every partition
    /// of every stream with a commit when no topics are given); -1 where none. v8 asks for
    /// several groups at once and is answered group by group.
    pub(super) fn offset_fetch(&self, r: OffsetFetchRequest, version: i16) -> OffsetFetchResponse {
        if version < 8 {
            let wanted = r.topics.map(|ts| {
                ts.into_iter()
                    .map(|t| (t.name, t.partition_indexes))
                    .collect()
            });
            let topics = self
                .committed(r.group_id.as_str(), wanted)
                .into_iter()
                .map(|(name, partitions)| {
                    OffsetFetchResponseTopic::default()
                        .with_name(name)
                        .with_partitions(
                            partitions
                                .into_iter()
                                .map(|(p, offset)| {
                                    OffsetFetchResponsePartition::default()
                                        .with_partition_index(p)
                                        .with_committed_offset(offset)
                                        .with_committed_leader_epoch(-1)
                                })
                                .collect(),
                        )
                })
                .collect();
            return OffsetFetchResponse::default().with_topics(topics);
        }
        let groups = r
            .groups
            .into_iter()
            .map(|g| {
                let wanted = g.topics.map(|ts| {
                    ts.into_iter()
                        .map(|t| (t.name, t.partition_indexes))
                        .collect()
                });
                let topics = self
                    .committed(g.group_id.as_str(), wanted)
                    .into_iter()
                    .map(|(name, partitions)| {
                        OffsetFetchResponseTopics::default()
                            .with_name(name)
                            .with_partitions(
                                partitions
                                    .into_iter()
                                    .map(|(p, offset)| {
                                        OffsetFetchResponsePartitions::default()
                                            .with_partition_index(p)
                                            .with_committed_offset(offset)
                                            .with_committed_leader_epoch(-1)
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                OffsetFetchResponseGroup::default()
                    .with_group_id(g.group_id)
                    .with_topics(topics)
            })
            .collect();
        OffsetFetchResponse::default().with_groups(groups)
    }

    /// `group`'s committed offsets (-1 where none) of the partitions in `wanted`, or, when
    /// `wanted` is None, of every partition of every stream that has a commit.
    fn committed(
        &self,
        group: &str,
        wanted: Option<Vec<(TopicName, Vec<i32>)>>,
    ) -> Vec<(TopicName, Vec<(i32, i64)>)> {
        let all = wanted.is_none();
        let wanted = wanted.unwrap_or_else(|| {
            self.log
                .streams()
                .into_iter()
                .map(|st| {
                    let n = st.partitions.len() as i32;
                    (TopicName(s(st.name)), (0..n).collect())
                })
                .collect()
        });
        wanted
            .into_iter()
            .map(|(name, partitions)| {
                let partitions = partitions
                    .into_iter()
                    .filter_map(|p| {
                        let committed = u32::try_from(p).ok().and_then(|pi| {
                            self.meta.cursor(group, name.as_str(), pi).ok().flatten()
                        });
                        // With no topics asked for, only partitions with a commit are listed.
                        if all && committed.is_none() {
                            return None;
                        }
                        Some((p, committed.unwrap_or(-1)))
                    })
                    .collect();
                (name, partitions)
            })
            .filter(|(_, partitions): &(_, Vec<_>)| !all || !partitions.is_empty())
            .collect()
    }

    pub(super) fn describe_groups(&self, r: DescribeGroupsRequest) -> DescribeGroupsResponse {
        DescribeGroupsResponse::default().with_groups(
            r.groups
                .into_iter()
                .map(|id| match self.groups.describe(id.as_str()) {
                    // As Kafka before DescribeGroups v6 (KIP-1043): a group nobody has
                    // joined is described as Dead, without an error.
                    None => DescribedGroup::default()
                        .with_group_id(id)
                        .with_error_code(NONE)
                        .with_group_state(s("Dead")),
                    Some(g) => DescribedGroup::default()
                        .with_group_id(id)
                        .with_group_state(s(g.state))
                        .with_protocol_type(s(g.protocol_type))
                        .with_protocol_data(s(g.protocol))
                        .with_members(
                            g.members
                                .into_iter()
                                .map(|(member, client, assignment)| {
                                    DescribedGroupMember::default()
                                        .with_member_id(s(member))
                                        .with_client_id(s(client))
                                        .with_member_assignment(assignment)
                                })
                                .collect(),
                        ),
                })
                .collect(),
        )
    }

    pub(super) fn list_groups(&self) -> ListGroupsResponse {
        ListGroupsResponse::default().with_groups(
            self.groups
                .list()
                .into_iter()
                .map(|(id, protocol_type, state)| {
                    ListedGroup::default()
                        .with_group_id(GroupId(s(id)))
                        .with_protocol_type(s(protocol_type))
                        .with_group_state(s(state))
                        .with_group_type(s("classic"))
                })
                .collect(),
        )
    }
}
