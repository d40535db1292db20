# Cluster layer: membership, Disk Paxos, the network accelerator, the lock manager.
foreach(f membership paxos net_channel mailbox lock_service status)
  if(EXISTS ${CMAKE_CURRENT_LIST_DIR}/${f}.cc)
    list(APPEND AGORAFS_SOURCES ${CMAKE_CURRENT_LIST_DIR}/${f}.cc)
  endif()
endforeach()
